"""The glibc malloc settings and the XLA flag under which XLA:CPU reuses its step buffers, applied by `import cnnjax`.

Why. XLA:CPU allocates every execution's temporary buffer with malloc, on one
of the worker threads that also compile: 289 MB for a MobileNet v2 training
step at 128 px and batch 16. glibc gives every thread but the main one an
arena of its own, made of heaps of at most 64 MiB, so it serves a request that
large from a fresh `mmap`, whatever `M_MMAP_MAX` says, and unmaps it on free:
every step faults every page of it in again, zeroed by the kernel. That was
74,000 minor page faults per MobileNet v2 step on a 2-core AMD EPYC, a third of
the step's CPU time. BENCHMARKS.md has the measurements.

What. `apply()`, which `import cnnjax` calls, makes every such buffer fit in a
thread's heap, and the heap keep it for the next step:

- `HEAP_FLAG`, appended to `XLA_FLAGS`, has XLA split a step's temporaries into
  allocations of at most 60 MiB (`xla_multiheap_size_constraint_per_heap`);
- `SETTINGS`, set with glibc's `mallopt` (through ctypes): no `mmap`, no
  trimming, and a top pad of a whole heap, so that glibc never deletes a
  thread's heap once made.

The compiler's threads keep their own arenas, so compilation runs as fast as
without (an earlier design, one arena for the whole process, also removed the
faults but made the first step 1.2-1.5x slower: the compiling threads queued
for its lock). A single buffer larger than a heap (one activation above 64 MiB,
far beyond the batch sizes CPUs train with) is still mapped afresh.

glibc reads the same parameters from `MALLOC_*` environment variables when a
process starts, but `mallopt` sets them at run time just as well, and XLA reads
`XLA_FLAGS` when JAX's backends start: in a notebook or a script, `import jax`
first is fine, a JAX computation first is not. So no launcher and no
re-execution is needed anywhere. Not applied:

- where `CNNJAX_HOST_ALLOCATOR=0` (the opt-out);
- where the environment sets any `MALLOC_*` variable (the user's choice stands);
- off Linux with glibc;
- unless `CNNJAX_HOST_ALLOCATOR=1` asks for them, where a JAX accelerator
  plugin (CUDA, ROCm, TPU) is installed: such a process computes on the
  accelerator, and the settings were measured for XLA:CPU only;
- where JAX's backends started before `import cnnjax` ("too late": `state()`
  says so, and the training loop and `python -m experiments.run` print one
  line naming the fix);
- where this machine measured its steps no faster with these settings
  (`python -m cnnjax.measure_allocator`, kept in the CPU's tuning table:
  `cnnjax.models.tuning`). Unmeasured machines get them.

`state()` says which. Where `XLA_FLAGS` already sets the heap size, that value
stands and only the `mallopt` settings are made.

Cost. Memory: the process keeps its peak heaps until it exits, as a caching
allocator does, and each thread that has run a step keeps its own copy of the
step's buffers: MobileNet v2's process above peaked at 1.67 GB against 1.29 GB
without. And caching: XLA:CPU cannot serialise a program whose temporaries were
split (more than 60 MiB of them), so such a program is written neither to JAX's
persistent cache (whose warning for it `apply` silences) nor to cnnjax's step
cache (which says so in an INFO line): it compiles afresh in each process. Smaller
programs, most of them, keep one allocation and are cached as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
import warnings
from collections.abc import Mapping

from cnnjax import xla_cpu

log = logging.getLogger("cnnjax")

ENV_OPT_OUT = "CNNJAX_HOST_ALLOCATOR"
# mallopt's parameter numbers (glibc's malloc.h) and the values cnnjax sets.
SETTINGS = {
    "M_MMAP_MAX": (-4, 0),  # a buffer that fits a heap is served from one, never mapped, ...
    "M_TRIM_THRESHOLD": (-1, 1 << 30),  # ... what is freed stays for the next step, ...
    "M_TOP_PAD": (-2, 1 << 26),  # ... and a thread's heap (64 MiB at most) is never deleted.
}
HEAP_OPTION = "xla_multiheap_size_constraint_per_heap"
# A step's temporaries in allocations of at most 60 MiB, each within a 64 MiB thread heap.
# A program whose temporaries fit in one (most programs) keeps one allocation, which XLA:CPU
# can serialise; one split into several cannot be (`SERIALISE_ERROR`).
HEAP_FLAG = f"--{HEAP_OPTION}={60 << 20}"
SERIALISE_ERROR = "Multiple temp buffer allocations found"
# Which settings a machine's measurement was made with: one made with others is not used.
SETTINGS_NAME = "thread heaps: no mmap, no trim, top pad 64 MiB, XLA heaps of 60 MiB"
TOO_LATE = ("too late: JAX's backends started before `import cnnjax`, so XLA has read its "
            "flags and each step's buffers are faulted in again. "
            "Import cnnjax before running any JAX computation (in a notebook, restart the "
            "kernel), or set CNNJAX_HOST_ALLOCATOR=0 to silence this")

_state = {"state": "not applied yet"}


def supported() -> bool:
  """Linux with glibc: the allocator these settings are for."""
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _requested(env: Mapping[str, str]) -> bool | None:
  """True: asked for; False: opted out; None: not said (on unless an accelerator is installed)."""
  value = env.get(ENV_OPT_OUT, "").strip().lower()
  if value not in xla_cpu.SWITCH_OFF + xla_cpu.SWITCH_ON + ("",):
    raise ValueError(f"{ENV_OPT_OUT}={env[ENV_OPT_OUT]!r} is neither on nor off: set it to 0 "
                     "to run without the allocator settings, or 1 to use them (unset: used "
                     "unless a JAX accelerator plugin is installed)")
  return None if value == "" else value in xla_cpu.SWITCH_ON


def users_own(env: Mapping[str, str]) -> dict[str, str]:
  """The `MALLOC_*` variables of `env`: glibc read them at start; cnnjax leaves them be."""
  return {k: v for k, v in env.items() if k.startswith("MALLOC_")}


def decide(env: Mapping[str, str], plugins: list[str], backends_started: bool,
           is_supported: bool = True, measured: str | None = None) -> str:
  """"apply", or why not: the rule of the module docstring, as a pure function.

  `measured` is this machine's recorded choice ("on", "off" or None: not measured).
  """
  requested = _requested(env)
  if not is_supported:
    return "not applicable (not Linux with glibc)"
  if requested is False:
    return f"opted out ({ENV_OPT_OUT}={env[ENV_OPT_OUT]})"
  if own := users_own(env):
    return f"the user's own settings stand ({', '.join(f'{k}={v}' for k, v in sorted(own.items()))})"
  if plugins and not requested:
    return (f"not applied: accelerator plugins installed ({', '.join(plugins)}); the settings "
            f"were measured for XLA:CPU only ({ENV_OPT_OUT}=1 applies them)")
  if measured == "off" and not requested:
    return ("not applied: this machine measured its steps no faster with them (python -m "
            f"cnnjax.measure_allocator; {ENV_OPT_OUT}=1 applies them)")
  if backends_started:
    return TOO_LATE
  return "apply"


def _mallopt():
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  function = libc.mallopt
  function.argtypes, function.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return function


def apply() -> str:
  """Sets SETTINGS with mallopt and appends HEAP_FLAG to XLA_FLAGS where `decide` says so
  (once per process); the state."""
  if _state["state"] != "not applied yet":
    return state()
  decision = decide(os.environ, xla_cpu.accelerator_plugins() if supported() else [],
                    xla_cpu._backends_started() if "jax" in sys.modules else False, supported(),
                    measured_choice())
  if decision != "apply":
    _state["state"] = decision
    return decision
  mallopt = _mallopt()
  failed = [name for name, (parameter, value) in SETTINGS.items() if mallopt(parameter, value) != 1]
  if HEAP_OPTION not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HEAP_FLAG}".strip()
  # JAX's persistent cache warns for each program it cannot write; these compile afresh in
  # each process, as the module docstring says, and are not worth a warning each.
  warnings.filterwarnings("ignore", message=f"Error writing persistent compilation cache entry "
                          f".*{SERIALISE_ERROR}")
  if failed:
    # Never an error: the import must succeed; the process runs as it would have without.
    warnings.warn(f"cnnjax.host_allocator: glibc's mallopt refused {', '.join(failed)}; "
                  "XLA:CPU's step buffers may be faulted in on every step", stacklevel=3)
    _state["state"] = f"partly applied: mallopt refused {', '.join(failed)}"
  else:
    _state["state"] = "active"
  return _state["state"]


def state() -> str:
  """"active", or why this process runs without the settings."""
  return _state["state"]


def too_late() -> bool:
  """Whether the settings would apply but JAX's backends started before `import cnnjax`."""
  return state() == TOO_LATE


def warn_if_too_late() -> None:
  """One log line naming the fix, where `too_late()` (the training loop and the CLI call it)."""
  if too_late() and not _state.get("warned"):
    _state["warned"] = True
    log.warning("host allocator: %s", TOO_LATE)


# -- the per-machine measurement ------------------------------------------------------------

TUNING_ENTRY = "host_allocator"
# Steps at least this much faster with the settings, or they are left off on this machine.
GAIN = 0.05

# A user's own program: import jax, then cnnjax, then a plain jax.jit SGD step of a cnnjax
# model. Prints the state, the first call's seconds (trace, compile, run), and the median
# step time and minor faults over `steps` steps after 3 of warm-up.
PROBE = """
import json, resource, sys, time
import jax, jax.numpy as jnp, optax
import cnnjax
from cnnjax import host_allocator
name, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = cnnjax.create_model(name, num_classes=10)
x = jnp.ones((16, size, size, 3)); y = jnp.zeros((16,), jnp.int32)
variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1], train=False))()
tx = optax.sgd(0.01, momentum=0.9)
state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

@jax.jit
def step(state, x, y):
  params, stats, opt = state
  def loss(p):
    logits, new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                              mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
  (value, new), grads = jax.value_and_grad(loss, has_aux=True)(params)
  updates, opt = tx.update(grads, opt, params)
  return (optax.apply_updates(params, updates), new["batch_stats"], opt), value

start = time.perf_counter()
state, value = step(state, x, y); jax.block_until_ready(value)
first = time.perf_counter() - start
for _ in range(3):
  state, value = step(state, x, y); jax.block_until_ready(value)
times, faults = [], []
for _ in range(steps):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  start = time.perf_counter()
  state, value = step(state, x, y); jax.block_until_ready(value)
  times.append(time.perf_counter() - start)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": host_allocator.state(), "first_step_s": first,
                  "faults_per_step": sorted(faults)[len(faults) // 2],
                  "step_s": sorted(times)[len(times) // 2],
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def probe(env: Mapping[str, str], model: str = "mobilenet_v2", size: int = 128,
          steps: int = 6) -> dict:
  """`PROBE` run in a fresh process with environment `env`: its state, first-step seconds,
  median step seconds and minor faults per step. Raises RuntimeError with its stderr."""
  import json  # noqa: PLC0415
  import subprocess  # noqa: PLC0415

  out = subprocess.run([sys.executable, "-c", PROBE, model, str(size), str(steps)],
                       env=dict(env), capture_output=True, text=True, timeout=900)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def without_settings(env: Mapping[str, str]) -> dict[str, str]:
  """`env` for a child process that should decide afresh: no `MALLOC_*` variables, no opt-out,
  and no heap size in `XLA_FLAGS` (which this process's `import cnnjax` may have put there)."""
  clean = {k: v for k, v in env.items() if k not in users_own(env) and k != ENV_OPT_OUT}
  flags = [f for f in clean.get("XLA_FLAGS", "").split() if not f.startswith(f"--{HEAP_OPTION}=")]
  if flags:
    clean["XLA_FLAGS"] = " ".join(flags)
  else:
    clean.pop("XLA_FLAGS", None)
  return clean


def _probe_env(on: bool) -> dict[str, str]:
  env = without_settings(os.environ)
  env[ENV_OPT_OUT] = "1" if on else "0"
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  return env


def measure(rounds: int = 2) -> dict:
  """Times `PROBE` (MobileNet v2 at 128 px) with and without the settings, interleaved, and
  records this machine's choice in its tuning table: "on" where the median step is at least
  `GAIN` faster with them. Returns the entry recorded."""
  import statistics  # noqa: PLC0415
  import time  # noqa: PLC0415

  from cnnjax.models import tuning  # noqa: PLC0415

  runs: dict[str, list[dict]] = {"on": [], "off": []}
  for _ in range(rounds):
    for variant in runs:
      runs[variant].append(probe(_probe_env(variant == "on")))
  median = {v: {key: statistics.median(r[key] for r in results)
                for key in ("step_s", "first_step_s", "faults_per_step")}
            for v, results in runs.items()}
  step_ratio = median["on"]["step_s"] / median["off"]["step_s"]
  entry = {"choice": "on" if step_ratio <= 1 - GAIN else "off", "settings": SETTINGS_NAME,
           "step_on_over_off": step_ratio,
           "first_step_on_over_off": median["on"]["first_step_s"] / median["off"]["first_step_s"],
           "medians": median, "probe": "mobilenet_v2, 128 px, batch 16, a plain jax.jit SGD step",
           "measured": time.strftime("%Y-%m-%d")}
  mode = tuning.current_mode()
  if mode == "off":
    raise RuntimeError("CNNJAX_TUNING=off: no tuning table to record the choice in")
  tuning._table(mode).record(TUNING_ENTRY, entry, replace=True)
  return entry


def measured_choice() -> str | None:
  """This machine's recorded choice ("on" or "off"), or None where it was never measured with
  these settings."""
  try:
    from cnnjax.models import tuning  # noqa: PLC0415

    entry = tuning.lookup_entry(TUNING_ENTRY)
    # A choice measured with other settings (one arena, before) says nothing about these.
    return entry.get("choice") if entry and entry.get("settings") == SETTINGS_NAME else None
  except Exception as error:  # noqa: BLE001 - a table problem never stops an import
    warnings.warn(f"cnnjax.host_allocator: the tuning table could not be read ({error})",
                  stacklevel=3)
    return None
