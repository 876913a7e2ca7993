"""Choices of the CPU lowering that depend on the machine, measured on it once and kept on disk.

Which lowering of a kxk convolution is fastest on a CPU (XLA's convolution,
or im2col with XLA's forward pass or the patch matrix's), and whether XLA:CPU
should hand convolutions to the YNNPACK library, depends on the processor: a
choice tuned on a 2-core machine with a 67 GFLOP/s matmul peak was up to 31%
slower than PyTorch on an AVX-512 machine with 184. So `lowering` asks
`decide` for each such choice; the first time a choice is needed on a CPU
backend its candidates are compiled and timed, the fastest (unless within
`MARGIN` of the static heuristic's, which then stays) is written to a small
JSON table keyed by the CPU, and every later trace on that CPU reads it.
An entry is never re-measured or changed, so once decided a choice is
deterministic; entries only accumulate (shapes not yet seen).

Modes (the `CNNJAX_TUNING` variable, or `with use(mode):`):
- "measure" (default): look up, and measure and store what is missing;
- "off": the static heuristics; nothing is measured, read or written;
- a path to a table file: pinned, read only; choices missing from it take the
  static heuristics. Copy a measured table there to fix the choices of a
  cluster, a benchmark or a paper.

Tables live in `$CNNJAX_TUNING_DIR` (default `~/.cache/cnnjax/tuning`), one
per CPU: `<cpu model>-<hash of model, flags, cores, jaxlib>.json`. A corrupt
table is left as it is and measured again in memory, and an unwritable one
keeps its measurements in memory, each with one warning; the run goes on.
Nothing is measured when the process's default backend is not a CPU (a GPU
process that traces a model's CPU branch for export gets the heuristics), nor
in a multi-process run, whose processes must trace identical programs: pin a
table there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import platform
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping

import jax

FORMAT = 1
ENV_MODE = "CNNJAX_TUNING"
ENV_DIR = "CNNJAX_TUNING_DIR"
MODES = ("measure", "off")
# A candidate replaces the static heuristic's choice only when this much faster:
# timing noise here is about +-5%, and a flip on noise would make tables differ per run.
MARGIN = 0.05
# What a measurement times; a new value starts a new table (the old file is left as it was).
# 2: the forward pass counts too (version 1 timed gradients alone, whose forward XLA dropped).
# 3: every dense layer's forward pass alone is measured for inference, among all the kernels
# that can compute it, oneDNN's included (version 2 weighed XLA's against the patch matrix
# for im2col layers only, and its "forward" entries would stand in for the wider choice).
# 4: each sample repeats a short run to fill `SAMPLE_SECONDS`, and a candidate's time is
# its fastest sample (version 3 took the median of single runs, and the same candidate
# measured 43 and 74 ms in two tables of one machine).
MEASUREMENT = 4
ROUNDS = 5
SAMPLE_SECONDS = 0.02

# A candidate: a zero-argument function that compiles and returns a zero-argument run.
Candidate = Callable[[], Callable[[], object]]

# Part of jit's cache keys (see `lowering._MODE`): a function traced under another
# tuning mode is traced again.
_MODE = jax.make_user_context(None)
_tables: dict[str, "_Table"] = {}


@contextlib.contextmanager
def use(mode: str | os.PathLike) -> Iterator[None]:
  """Within the block, choices are made in `mode`: "measure", "off" or a pinned table's path."""
  with _MODE(_validated(mode)):
    yield


def current_mode() -> str:
  """"measure", "off", or the path of a pinned table."""
  mode = _MODE.value
  return mode if mode is not None else _validated(os.environ.get(ENV_MODE, "measure"))


def _validated(mode) -> str:
  mode = os.fspath(mode)
  if mode in MODES:
    return mode
  if not mode or mode.lower() in ("0", "false", "no", "on", "1", "auto"):
    raise ValueError(f"unknown tuning mode {mode!r}: choose one of {MODES} or the path of a "
                     f"tuning table (.json)")
  if not mode.endswith(".json"):
    raise ValueError(f"unknown tuning mode {mode!r}: choose one of {MODES} or the path of a "
                     f"tuning table ending in .json")
  return mode


def cpu_description() -> dict:
  """What the table is keyed by: the processor, its vector extensions, cores and jaxlib."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      key, _, value = line.partition(":")
      if key.strip() == "model name":
        model = value.strip()
      elif key.strip() in ("flags", "Features") and not flags:
        flags = set(value.split())
  except OSError:
    pass
  # Only the extensions that change which kernels XLA emits.
  vector = sorted(f for f in flags if re.match(r"(avx|amx|fma|sve|asimd|neon)", f))
  import jaxlib  # noqa: PLC0415

  from cnnjax.models import onednn  # noqa: PLC0415

  # The oneDNN wheel's version, or None: a table measured without its candidates is not
  # the one measured with them.
  return {"model": model, "machine": platform.machine(), "vector_extensions": vector,
          "cores": os.cpu_count(), "jaxlib": jaxlib.__version__, "measurement": MEASUREMENT,
          "onednn": onednn.installed_version()}


def table_path() -> pathlib.Path:
  """The measured table of this CPU (whatever the mode)."""
  description = cpu_description()
  digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:12]
  slug = re.sub(r"[^A-Za-z0-9]+", "-", description["model"]).strip("-")[:48] or "cpu"
  root = pathlib.Path(os.environ.get(ENV_DIR) or pathlib.Path.home() / ".cache" / "cnnjax" /
                      "tuning")
  return root / f"{slug}-{digest}.json"


class _Table:
  """One table file's entries, loaded once per process; writes merge, never overwrite entries."""

  def __init__(self, path: pathlib.Path, pinned: bool):
    self.path, self.pinned = path, pinned
    self.writable = not pinned
    self.entries = self._read(missing_ok=not pinned)

  def _read(self, missing_ok: bool) -> dict:
    try:
      payload = json.loads(self.path.read_text())
      if payload.get("format") != FORMAT or not isinstance(payload.get("entries"), dict):
        raise ValueError(f"not a format-{FORMAT} tuning table")
      return dict(payload["entries"])
    except (FileNotFoundError, NotADirectoryError):
      if not missing_ok:
        warnings.warn(f"cnnjax tuning table {self.path} does not exist; the static "
                      f"heuristics apply (set {ENV_MODE}=measure to measure)", stacklevel=4)
      return {}
    except (OSError, ValueError, AttributeError) as error:
      self.writable = False
      action = ("the static heuristics apply" if self.pinned else
                "measuring again in memory and leaving the file as it is")
      warnings.warn(f"cnnjax tuning table {self.path} is unreadable ({error}); {action}",
                    stacklevel=4)
      return {}

  def record(self, name: str, entry: dict, replace: bool = False) -> None:
    """Adds `entry`; one already on disk stands unless `replace` (a deliberate remeasurement)."""
    self.entries[name] = entry
    if not self.writable:
      return
    from cnnjax import fileio  # noqa: PLC0415

    try:
      on_disk = self._read(missing_ok=True)
      if not self.writable:  # it became unreadable since: leave it alone
        return
      # Another process may have decided meanwhile: its entries stand.
      merged = {**self.entries, **on_disk, **({name: entry} if replace else {})}
      self.entries = merged
      fileio.write_atomically(self.path, json.dumps(
          {"format": FORMAT, "cpu": cpu_description(), "entries": merged}, indent=1,
          sort_keys=True))
    except OSError as error:
      self.writable = False
      warnings.warn(f"cnnjax tuning table {self.path} cannot be written ({error}); its "
                    f"measurements are kept in memory for this process", stacklevel=4)


def _table(mode: str) -> _Table:
  pinned = mode != "measure"
  path = pathlib.Path(mode) if pinned else table_path()
  key = f"{pinned}:{path}"
  if key not in _tables:
    _tables[key] = _Table(path, pinned)
  return _tables[key]


def forget_tables() -> None:
  """Drops the tables read by this process, so the next choice reads the files again."""
  _tables.clear()


def lookup_entry(name: str) -> dict | None:
  """The stored entry for `name` in the mode in force (its choice and what it measured), or
  None; never measures."""
  mode = current_mode()
  if mode == "off":
    return None
  entry = _table(mode).entries.get(name)
  return entry if isinstance(entry, dict) else None


def lookup(name: str) -> str | None:
  """The stored choice for `name` in the mode in force, or None; never measures."""
  entry = lookup_entry(name)
  return entry.get("choice") if entry else None


def decide(name: str, candidates: Callable[[], Mapping[str, Candidate]], static: str) -> str:
  """The choice for `name`: from the table, else measured among `candidates()`, else `static`.

  `candidates` is called only when a measurement is due; `static` must be one of its keys.
  """
  mode = current_mode()
  if mode == "off":
    return static
  table = _table(mode)
  stored = lookup(name)
  if stored is not None:  # an entry this version does not know (edited by hand): the heuristic
    return stored if stored in candidates() else static
  # Processes of one multi-process run must trace identical programs, and their
  # measurements could differ: they take the heuristics unless given a pinned table.
  if table.pinned or jax.default_backend() != "cpu" or jax.process_count() > 1:
    return static
  seconds = measure(candidates())
  fastest = min(seconds, key=seconds.get)
  choice = fastest if seconds[fastest] < (1 - MARGIN) * seconds[static] else static
  table.record(name, {"choice": choice, "static": static,
                      "ms": {k: round(1e3 * v, 4) for k, v in seconds.items()}})
  return choice


def measure(candidates: Mapping[str, Candidate], rounds: int = ROUNDS,
            sample_seconds: float = SAMPLE_SECONDS) -> dict[str, float]:
  """Seconds per run of each candidate: its fastest of `rounds` samples, taken in alternation.

  A sample repeats the run enough times to last about `sample_seconds`, so a
  millisecond's run is not one scheduler tick's worth of noise. The fastest sample, not
  the median, because what slows a sample on a machine of two cores (another process, a
  thread of the runtime) only ever adds time. Measured on an AMD EPYC, seven ResNet layers'
  choices agreed with their most frequent one in 31 of 42 measurements by the median of
  single runs, and in 39 of 42 this way.

  Choices are made while a model is traced, so the candidates' data and runs are
  evaluated eagerly (`ensure_compile_time_eval`), not staged into that trace.
  """
  with jax.ensure_compile_time_eval():
    runs = {name: prepare() for name, prepare in candidates.items()}
    repeats = {}
    for name, run in runs.items():
      run()  # the first run pays for first touches of memory
      start = time.perf_counter()
      run()
      once = time.perf_counter() - start
      repeats[name] = max(1, math.ceil(sample_seconds / max(once, 1e-6)))
    samples = {name: [] for name in runs}
    for _ in range(rounds):
      for name, run in runs.items():
        start = time.perf_counter()
        for _ in range(repeats[name]):
          run()
        samples[name].append((time.perf_counter() - start) / repeats[name])
  return {name: min(values) for name, values in samples.items()}


def describe() -> dict:
  """The mode and the table in force (for cache keys and provenance)."""
  mode = current_mode()
  if mode == "off":
    return {"mode": "off"}
  table = _table(mode)
  return {"mode": "pinned" if table.pinned else "measure", "path": str(table.path)}
