"""Test-session configuration: the persistent compilation cache, shared fixtures.

JAX configuration belongs to entry points, never to the package import; the
test session is one.
"""

import json
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# The project's reference facts (../shared/reference), copied here so that a clone
# anywhere runs the suite; test_reference checks the copy against the original.
SHARED_REFERENCE_DIR = REPO.parent / "shared" / "reference"
REFERENCE_DIR = pathlib.Path(os.environ.get("CNNJAX_REFERENCE_DIR", REPO / "tests" / "reference"))

_CACHE = os.environ.get("CNNJAX_TEST_CACHE", str(pathlib.Path.home() / ".cache" / "cnnjax" / "jax-test-cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
os.environ["CNNJAX_TEST_CACHE"] = _CACHE  # subprocess workers share it
# Datasets that a test prepares without naming a directory go to this session's own, never to
# the user's ~/tensorflow_datasets (subprocess workers inherit it).
# The process that made it (xdist's controller, whose workers inherit it) removes it at the end.
_OWN_DATA_DIR = None
if not os.environ.get("CNNJAX_DATA_DIR"):
  _OWN_DATA_DIR = os.environ["CNNJAX_DATA_DIR"] = tempfile.mkdtemp(prefix="cnnjax-test-data-")
# The CPU lowering's static heuristics: no per-machine measurement, so every machine
# traces the same programs (tests/test_tuning.py measures in its own directories).
os.environ.setdefault("CNNJAX_TUNING", "off")


def pytest_sessionfinish(session, exitstatus):
  if _OWN_DATA_DIR:
    shutil.rmtree(_OWN_DATA_DIR, ignore_errors=True)


def run_compiled_quickly(fn, *args):
  """`fn(*args)` jitted at XLA optimisation level 0: for tests that are compile-bound and check
  values, never speed (a compile is several times faster there; the values are the same)."""
  from cnnjax.train import steps  # noqa: PLC0415

  return jax.jit(fn).lower(*args).compile(compiler_options=steps.FAST_COMPILE_OPTIONS)(*args)


def without_allocator_settings(env) -> dict:
  """`env` less cnnjax's allocator settings and their opt-out (see cnnjax.host_allocator)."""
  from cnnjax import host_allocator  # noqa: PLC0415

  return host_allocator.without_settings(env)


@pytest.fixture(scope="session")
def reference_models() -> dict:
  path = REFERENCE_DIR / "models.json"
  if not path.exists():
    pytest.fail(f"reference facts missing: {path} (set CNNJAX_REFERENCE_DIR)")
  return json.loads(path.read_text())["models"]


@pytest.fixture(scope="session")
def efficientnet_reference() -> str:
  path = REFERENCE_DIR / "efficientnet.md"
  if not path.exists():
    pytest.fail(f"reference facts missing: {path} (set CNNJAX_REFERENCE_DIR)")
  return path.read_text()


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> pathlib.Path:
  """A data directory with the embedded digits prepared (one per test worker)."""
  from cnnjax import data

  data_dir = tmp_path_factory.mktemp("tfds")
  data.prepare("digits", data_dir, progress=False)
  return data_dir
