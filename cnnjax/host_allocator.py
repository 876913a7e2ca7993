"""The glibc malloc settings under which XLA:CPU reuses its step buffers, applied by `import cnnjax`.

Why. XLA:CPU allocates every execution's temporary buffer with malloc, on one
of its worker threads: 289 MB for a MobileNet v2 training step at 128 px and
batch 16. glibc serves a request that large from a fresh `mmap` (a thread's
arena can never hold it, whatever `M_MMAP_MAX` says) and unmaps it on free,
so every step faults every page of it in again, zeroed by the kernel: 74,000
minor page faults per MobileNet v2 step on a 2-core AMD EPYC, a third of the
step's CPU time. With one arena, no `mmap` and no trimming, the buffer comes
from the main heap and stays there for the next step: no page faults.
BENCHMARKS.md has the measurements.

What. `apply()`, which `import cnnjax` calls, sets `SETTINGS` with glibc's
`mallopt` (through ctypes). glibc reads the same parameters from `MALLOC_*`
environment variables when a process starts, but `mallopt` sets them at run
time just as well, provided XLA:CPU has not started its threads yet: in a
notebook or a script, `import jax` first is fine, a JAX computation first is
not. So no launcher and no re-execution is needed anywhere. Not applied:

- where `CNNJAX_HOST_ALLOCATOR=0` (the opt-out);
- where the environment sets any `MALLOC_*` variable (the user's choice stands);
- off Linux with glibc;
- unless `CNNJAX_HOST_ALLOCATOR=1` asks for them, where a JAX accelerator
  plugin (CUDA, ROCm, TPU) is installed: such a process computes on the
  accelerator, the settings were measured for XLA:CPU only, and the one GPU
  run made with them (an H100 host, 16 cores) spent 9 minutes of kernel time
  in 2 minutes of wall time without finishing its first trial;
- where JAX's backends started before `import cnnjax` ("too late": `state()`
  says so, and the training loop and `python -m experiments.run` print one
  line naming the fix).

`state()` says which.

Cost. The process keeps its peak heap until it exits, as a caching allocator
does (the heap settles after a few steps), and its threads share one arena's
lock, which makes compilation, which allocates from several threads, somewhat
slower (BENCHMARKS.md measures the first step, compile and run, both ways).
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
    "M_ARENA_MAX": (-8, 1),  # every thread allocates from the main heap, ...
    "M_MMAP_MAX": (-4, 0),  # ... which grows with brk, never by a fresh mapping, ...
    "M_TRIM_THRESHOLD": (-1, 1 << 30),  # ... and keeps what is freed for the next step.
}
TOO_LATE = ("too late: JAX's backends started before `import cnnjax`, so XLA:CPU's threads "
            "already have their allocator arenas and each step's buffers are faulted in again. "
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
           is_supported: bool = True) -> str:
  """"apply", or why not: the rule of the module docstring, as a pure function."""
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
  if backends_started:
    return TOO_LATE
  return "apply"


def _mallopt():
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  function = libc.mallopt
  function.argtypes, function.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return function


def apply() -> str:
  """Sets SETTINGS with mallopt where `decide` says so (once per process); the state."""
  if _state["state"] != "not applied yet":
    return state()
  decision = decide(os.environ, xla_cpu.accelerator_plugins() if supported() else [],
                    xla_cpu._backends_started() if "jax" in sys.modules else False, supported())
  if decision != "apply":
    _state["state"] = decision
    return decision
  mallopt = _mallopt()
  failed = [name for name, (parameter, value) in SETTINGS.items() if mallopt(parameter, value) != 1]
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


if __name__ == "__main__":
  import cnnjax  # noqa: F401  (applies them)

  print(state())
