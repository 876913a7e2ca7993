"""Compiled steps kept on disk and found again without tracing.

JAX's persistent compilation cache is keyed by the lowered program, so even a
warm cache pays for tracing the model in Python first: 4 of the 5 seconds it
takes to get a ResNet-50 training step back. This cache is keyed by what
determines that program instead, so a hit skips tracing, lowering and XLA:

- a caller's description of the step (the loop passes the run's config and what
  it derived from the dataset: classes, image shape, steps);
- the abstract arguments: tree structure, shapes, dtypes, weak types, shardings;
- the compiler options, the convolution lowering mode, every JAX config value
  that is not about caching, logging or dumps, and `XLA_FLAGS`;
- the versions of Python, jax, jaxlib, flax and optax, a hash of cnnjax's own
  source, and the devices (platform, kind, ids, processes).

A hit loads the serialized executable (`jax.experimental.serialize_executable`).
A miss, or an entry that cannot be loaded, compiles afresh and writes the entry
atomically. Afresh means past JAX's caches, the persistent one and the
in-memory ones: an XLA:CPU executable that JAX's persistent cache loaded
serialises without its kernels, and running it after loading it again fails
with "Function ... not found" (jaxlib 0.10.2). So a miss costs a full compile;
the functions the process has already run keep their traces and executables.
Entries live in `<jax_compilation_cache_dir>/cnnjax-steps/`; with JAX's cache off this cache
is off too. Only steps whose model is cnnjax's own may be cached: a model
defined elsewhere can change without changing anything in the key. Entries are
pickles, and loading one can run code: trust the directory as you would JAX's
own cache. Nothing evicts entries; deleting the directory is always safe.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pathlib
import pickle
import platform
from typing import Any

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache
from jax.extend import backend as jax_backend

from cnnjax import fileio, xla_cpu
from cnnjax.models import lowering, onednn, tuning

log = logging.getLogger("cnnjax.train")

SUBDIRECTORY = "cnnjax-steps"
# XLA:CPU's refusal to serialise a program whose temporaries lie in several heaps.
MULTIPLE_HEAPS = "Multiple temp buffer allocations"
_PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1]
# JAX options that change neither the program nor how it compiles.
_IRRELEVANT_CONFIG = ("cache", "log", "traceback", "dump", "pprint", "explain")


def directory() -> pathlib.Path | None:
  """Where entries go: beside JAX's persistent compilation cache, or None when it is off."""
  root = jax.config.values.get("jax_compilation_cache_dir")
  if not root or not jax.config.values.get("jax_enable_compilation_cache", True):
    return None
  return pathlib.Path(root).expanduser() / SUBDIRECTORY


@functools.cache
def source_hash() -> str:
  """sha256 of every Python and C++ file of the cnnjax package (path and contents)."""
  digest = hashlib.sha256()
  for path in sorted([*_PACKAGE_ROOT.rglob("*.py"), *_PACKAGE_ROOT.rglob("*.cc")]):
    digest.update(str(path.relative_to(_PACKAGE_ROOT)).encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


def _versions() -> dict[str, str]:
  return {"python": platform.python_version(),
          **{name: importlib.metadata.version(name)
             for name in ("jax", "jaxlib", "flax", "optax")}}


def _abstract(leaf) -> dict[str, Any]:
  aval = jax.typeof(leaf)
  sharding = getattr(leaf, "sharding", None)
  return {"aval": str(aval), "weak_type": bool(getattr(aval, "weak_type", False)),
          "sharding": repr(sharding),
          "devices": sorted(d.id for d in sharding.device_set) if sharding is not None else None}


def key_material(args: tuple, description: Any, compiler_options: dict) -> dict[str, Any]:
  """Everything the key is a hash of (JSON-serialisable; `description` via `str` where not)."""
  leaves, treedef = jax.tree.flatten(args)
  devices = jax.devices()
  config = {name: repr(value) for name, value in sorted(jax.config.values.items())
            if not any(word in name for word in _IRRELEVANT_CONFIG)}
  return {
      "description": description,
      "tree": str(treedef),
      "leaves": [_abstract(leaf) for leaf in leaves],
      "compiler_options": {k: str(v) for k, v in sorted(compiler_options.items())},
      "lowering": lowering.current_mode(),
      "tuning": tuning.describe(),
      "jax_config": config,
      # Less a forced host device count: "devices" holds what it decides, so a Ray driver and
      # its workers, forced to different counts, share entries for the same devices.
      "xla_flags": " ".join(xla_cpu.FORCED_DEVICES.sub("", os.environ.get("XLA_FLAGS", "")).split()),
      "versions": _versions(),
      "cnnjax_source": source_hash(),
      "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                  "platform_version": devices[0].client.platform_version,
                  "ids": [d.id for d in devices], "process_index": jax.process_index(),
                  "process_count": jax.process_count()},
  }


def entry_key(material: dict[str, Any]) -> str:
  text = json.dumps(material, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()


def _load(path: pathlib.Path):
  try:
    payload, in_tree, out_tree = pickle.loads(path.read_bytes())
    if onednn.TARGET_PREFIX.encode() in payload:
      # The step calls oneDNN's convolutions (a measured choice): their FFI targets must
      # be registered before XLA loads a program that names them.
      onednn.register()
    return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
  except FileNotFoundError:
    return None
  except Exception as error:  # noqa: BLE001 - a bad entry is a miss, and gets rewritten
    log.warning("cnnjax step cache: %s could not be loaded (%s: %s); compiling again",
                path, type(error).__name__, error)
    return None


@contextlib.contextmanager
def _past_jax_cache():
  """JAX's persistent cache off for what compiles inside, on again after.

  JAX decides once per process whether it uses its cache; `reset_cache` makes it
  decide again. The in-memory executables go too, since any of them may have come
  from the persistent cache; only those: the traces, lowerings and the executables
  that functions already called hold stay, so nothing else traces or compiles again
  (`jax.clear_caches` dropped them all: every trial of a sweep compiled its small
  helpers afresh). Not thread-safe: nothing else should compile meanwhile.
  """
  enabled = jax.config.values["jax_enable_compilation_cache"]
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  # (`jax.extend.backend` is JAX's API for libraries; where a version lacks the call, every
  # cache goes, as before.)
  getattr(jax_backend, "clear_in_memory_compilation_cache", jax.clear_caches)()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def load_or_compile(jitted, args: tuple, *, description: Any,
                    compiler_options: dict | None = None,
                    cache_dir: pathlib.Path | None = None) -> tuple[Any, bool]:
  """`jitted.lower(*args).compile(compiler_options)`, from disk when it was done before.

  Returns (compiled, loaded): `loaded` is True when the executable came from the cache.
  `cache_dir` defaults to `directory()`; with neither, it simply compiles.
  """
  compiler_options = dict(compiler_options or {})
  # Options given, even none, so that `compile` skips the executable a lowering keeps from
  # an earlier compile without options (it may have come from JAX's persistent cache).
  compile_now = lambda: jitted.lower(*args).compile(compiler_options=compiler_options)  # noqa: E731
  cache_dir = directory() if cache_dir is None else pathlib.Path(cache_dir)
  if cache_dir is None:
    return compile_now(), False
  path = cache_dir / (entry_key(key_material(args, description, compiler_options)) + ".step")
  compiled = _load(path)
  if compiled is not None:
    return compiled, True
  with _past_jax_cache():
    compiled = compile_now()
  try:
    payload = pickle.dumps(serialize_executable.serialize(compiled))
  except (ValueError, NotImplementedError, pickle.PicklingError, TypeError,
          jax.errors.JaxRuntimeError) as error:
    # XLA:CPU cannot serialise a program whose temporaries lie in several heaps, which
    # cnnjax.host_allocator asks for where they exceed one: it compiles afresh in each process.
    # That trade is deliberate, so it is not a warning (the quickstart's own step makes it).
    expected = MULTIPLE_HEAPS in str(error)
    log.log(logging.INFO if expected else logging.WARNING,
            "cnnjax step cache: this step cannot be serialised (%s); not cached", error)
  else:
    try:
      fileio.write_atomically(path, payload)
    except OSError as error:  # a read-only or full disk costs the cache, not the run
      log.warning("cnnjax step cache: could not write %s (%s); not cached", path, error)
  return compiled, False


def is_cnnjax_model(model) -> bool:
  """True for models defined in cnnjax, the only ones whose code the key covers."""
  return type(model).__module__.split(".")[0] == "cnnjax"
