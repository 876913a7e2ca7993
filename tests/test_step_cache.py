"""The on-disk cache of compiled steps: same results, a key that sees every change, bad
entries recompiled, and a key that is the same in another process."""

import functools
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import cnnjax
from jax.experimental.compilation_cache import compilation_cache

from cnnjax.models import lowering, tuning
from cnnjax.train import optim, step_cache, steps

REPO = os.path.dirname(os.path.dirname(__file__))
DESCRIPTION = {"model": "resnet20", "depth": 8, "widths": [4, 4, 4], "classes": 3}


def _setup(batch_size=4, size=8):
  # Misses compile afresh, so the smallest ResNet keeps them cheap.
  model = cnnjax.create_model("resnet20", num_classes=3, depth=8, widths=(4, 4, 4))
  tx = optim.make_optimizer("sgd", optim.schedule_shape("constant", 1, 1), learning_rate=0.1,
                            momentum=0.9)
  train, _ = steps.jit_steps(model, tx, steps.StepConfig(), steps.make_mesh(jax.devices()[:1]))
  state = steps.init_state(model, tx, (size, size, 3), seed=0)
  batch = {"image": jax.random.normal(jax.random.key(1), (batch_size, size, size, 3)),
           "label": jnp.arange(batch_size, dtype=jnp.int32) % 3}
  return model, train, state, batch


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)  # the steps donate their state


def _numbers(tree):
  unwrap = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x  # noqa: E731
  return [np.asarray(unwrap(x)) for x in jax.tree.leaves(tree)]


def _key(state, batch, description=DESCRIPTION, options=None):
  return step_cache.entry_key(step_cache.key_material((state, batch), description, options or {}))


def test_a_loaded_step_computes_exactly_what_the_compiled_one_does(tmp_path):
  _, train, state, batch = _setup()
  expected_state, expected_metrics = train.lower(state, batch).compile()(_copy(state), batch)

  traces = []

  @jax.jit
  def helper(x):
    traces.append(x)
    return x + 1

  helper(1.0)
  first, loaded_first = step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION,
                                                   cache_dir=tmp_path)
  helper(2.0)  # a miss compiles past JAX's caches without making other functions trace again
  assert len(traces) == 1
  second, loaded_second = step_cache.load_or_compile(train, (state, batch),
                                                     description=DESCRIPTION, cache_dir=tmp_path)
  assert (loaded_first, loaded_second) == (False, True)
  assert len(list(tmp_path.glob("*.step"))) == 1
  for compiled in (first, second):
    new_state, metrics = compiled(_copy(state), batch)
    for got, want in zip(_numbers((new_state, metrics)), _numbers((expected_state, expected_metrics))):
      np.testing.assert_array_equal(got, want)
  assert int(new_state.step) == 1 and float(metrics["loss"]) > 0


def test_the_key_changes_with_everything_the_program_depends_on():
  _, _, state, batch = _setup()
  base = _key(state, batch)
  assert _key(state, batch) == base  # deterministic
  assert _key(state, {**batch, "image": batch["image"][:2], "label": batch["label"][:2]}) != base
  assert _key(state, {**batch, "image": batch["image"].astype(jnp.bfloat16)}) != base
  assert _key(state, batch, {**DESCRIPTION, "classes": 4}) != base
  assert _key(state, batch, options={"xla_backend_optimization_level": 0}) != base
  with lowering.use("xla"):
    assert _key(state, batch) != base
  params = jax.tree.map(lambda x: x, state.params)
  params["extra"] = jnp.zeros(())
  assert _key(state.replace(params=params), batch) != base  # the tree's structure
  with jax.default_matmul_precision("highest"):
    assert _key(state, batch) != base  # a JAX config value that changes tracing


def test_xla_flags_are_in_the_key_but_a_forced_host_device_count_is_not(monkeypatch):
  """The devices themselves are in the key; the flag that made them exist is not, so a
  process forced to one device and one forced to two share entries for device 0."""
  _, _, state, batch = _setup()
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  base = _key(state, batch)
  for forced in ("--xla_force_host_platform_device_count=1 --xla_cpu_enable_fast_math=false",
                 "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"):
    monkeypatch.setenv("XLA_FLAGS", forced)
    assert _key(state, batch) == base, forced
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
  assert _key(state, batch) != base


def test_a_corrupt_entry_is_compiled_again_and_replaced(tmp_path, caplog):
  _, train, state, batch = _setup()
  step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION, cache_dir=tmp_path)
  (entry,) = tmp_path.glob("*.step")
  entry.write_bytes(entry.read_bytes()[:1000])
  with caplog.at_level(logging.WARNING, logger="cnnjax.train"):
    compiled, loaded = step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION,
                                                  cache_dir=tmp_path)
  assert not loaded and "could not be loaded" in caplog.text
  assert float(compiled(_copy(state), batch)[1]["loss"]) > 0
  assert step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION,
                                    cache_dir=tmp_path)[1]
  assert not list(tmp_path.glob("*.partial"))


def test_it_is_off_without_a_compilation_cache():
  saved = jax.config.values["jax_compilation_cache_dir"]
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert step_cache.directory() is None
    jax.config.update("jax_compilation_cache_dir", "/some/cache")
    assert str(step_cache.directory()) == f"/some/cache/{step_cache.SUBDIRECTORY}"
  finally:
    jax.config.update("jax_compilation_cache_dir", saved)


def test_only_cnnjax_models_are_cached():
  class Outside(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(x)

  assert step_cache.is_cnnjax_model(cnnjax.create_model("resnet20", num_classes=3))
  assert not step_cache.is_cnnjax_model(Outside())


_OTHER_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import test_step_cache as t
from cnnjax.train import step_cache
_, _, state, batch = t._setup()
print(json.dumps(step_cache.key_material((state, batch), t.DESCRIPTION, {}), default=str))
"""


def test_another_process_computes_the_same_key():
  """A key with a memory address or a set order in it would never hit across processes."""
  _, _, state, batch = _setup()
  out = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, os.path.dirname(__file__)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": "123"})
  assert out.returncode == 0, out.stderr[-3000:]
  theirs = json.loads(out.stdout.strip().splitlines()[-1])
  ours = json.loads(json.dumps(step_cache.key_material((state, batch), DESCRIPTION, {}),
                               default=str))
  assert {k: v for k, v in theirs.items() if ours.get(k) != v} == {}   # names what differs
  assert step_cache.entry_key(theirs) == _key(state, batch)


def test_a_source_change_changes_the_hash(tmp_path, monkeypatch):
  package = tmp_path / "cnnjax"
  (package / "models").mkdir(parents=True)
  (package / "models" / "a.py").write_text("X = 1\n")
  monkeypatch.setattr(step_cache, "_PACKAGE_ROOT", package)
  step_cache.source_hash.cache_clear()
  try:
    before = step_cache.source_hash()
    (package / "models" / "a.py").write_text("X = 2\n")
    step_cache.source_hash.cache_clear()
    assert step_cache.source_hash() != before
  finally:
    step_cache.source_hash.cache_clear()


def test_a_step_that_jax_cache_holds_is_still_cached_runnable(tmp_path):
  """An executable JAX's persistent cache loaded serialises without its kernels on XLA:CPU;
  the step cache must compile afresh rather than store that."""
  _, train, state, batch = _setup()
  saved = {name: jax.config.values[name] for name in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
  try:
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    train.lower(state, batch).compile()  # now in JAX's cache
    assert list((tmp_path / "jax").iterdir())
    # ... and in memory as JAX's cache gave it back, as in a process that found it there.
    jax.clear_caches()
    train.lower(state, batch).compile()
    step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION)
    compiled, loaded = step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION)
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()
  assert loaded
  assert float(compiled(_copy(state), batch)[1]["loss"]) > 0


def test_an_unwritable_cache_directory_costs_the_cache_not_the_step(tmp_path, caplog):
  _, train, state, batch = _setup()
  not_a_directory = tmp_path / "file"
  not_a_directory.write_text("a user's file, kept")
  with caplog.at_level(logging.WARNING, logger="cnnjax.train"):
    compiled, loaded = step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION,
                                                  cache_dir=not_a_directory / "steps")
  assert not loaded and "could not write" in caplog.text
  _, metrics = compiled(_copy(state), batch)
  assert np.isfinite(float(metrics["loss"]))
  assert not_a_directory.read_text() == "a user's file, kept"


def test_a_step_whose_temporaries_lie_in_several_heaps_runs_uncached(tmp_path, caplog):
  """XLA:CPU cannot serialise such a program (cnnjax.host_allocator asks for several heaps
  where a program's temporaries exceed one): the step costs the cache, never the run."""
  _, train, state, batch = _setup()
  options = {"xla_multiheap_size_constraint_per_heap": 1024}  # every temporary its own heap
  with caplog.at_level(logging.INFO, logger="cnnjax.train"):
    compiled, loaded = step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION,
                                                  compiler_options=options, cache_dir=tmp_path)
  assert not loaded and "cannot be serialised" in caplog.text
  # A deliberate trade of the allocator's settings, said at INFO: not a warning to act on.
  [record] = [r for r in caplog.records if "cannot be serialised" in r.getMessage()]
  assert record.levelno == logging.INFO and step_cache.MULTIPLE_HEAPS in record.getMessage()
  assert list(tmp_path.iterdir()) == []
  reference, _ = step_cache.load_or_compile(train, (state, batch), description=DESCRIPTION,
                                            cache_dir=tmp_path / "whole")
  assert np.array_equal(*(float(c(_copy(state), batch)[1]["loss"]) for c in (compiled, reference)))


def test_one_compiled_initialisation_serves_every_seed_and_computes_what_create_state_does(
    tmp_path, monkeypatch):
  model, _, _, _ = _setup()
  tx = optax.sgd(0.1, momentum=0.9)
  monkeypatch.setattr(step_cache, "directory", lambda: tmp_path)
  for seed in (0, 2**31 + 5):  # a seed past int32 too: the key is made outside the program
    with tuning.use("off"):
      baked = jax.jit(functools.partial(steps.create_state, model, tx, (8, 8, 3), seed)).lower()
    expected = baked.compile(compiler_options=steps.FAST_COMPILE_OPTIONS)()
    for description in (None, DESCRIPTION):
      state = steps.init_state(model, tx, (8, 8, 3), seed, description=description)
      assert jax.tree.structure(state) == jax.tree.structure(expected)
      for got, want in zip(_numbers(state), _numbers(expected)):
        np.testing.assert_array_equal(got, want)
  assert len(list(tmp_path.glob("*.step"))) == 1  # the second seed's came from the cache
