"""The glibc malloc settings under which XLA:CPU reuses its step buffers instead of faulting them in.

Why. XLA:CPU allocates every execution's temporary buffer with malloc, on one
of its worker threads: 289 MB for a MobileNet v2 training step at 128 px and
batch 16. glibc serves a request that large from a fresh `mmap` (a thread's
arena can never hold it, whatever `M_MMAP_MAX` says) and unmaps it on free,
so every step faults every page of it in again, zeroed by the kernel: 75,000
minor page faults and 200 ms of kernel time per MobileNet v2 step on a 2-core
AMD EPYC, a third of the step's CPU time. With one arena, no `mmap` and no
trimming, the buffer comes from the main heap and stays there for the next
step: no page faults. The same holds for PyTorch's CPU tensors.
BENCHMARKS.md has the measurements.

What. `SETTINGS`, three environment variables glibc reads once, when the
process starts; so, unlike `cnnjax.xla_cpu`, `import cnnjax` cannot apply
them. Instead:
- `python -m experiments.run` and `python -m benchmarks.train_step` call
  `reexec()`, which starts the same command again, once, with them;
- `make run`, `make bench` and Ray's trial workers start with them (`child_settings`);
- a notebook's kernel gets them from its launcher:
  `env $(python -m cnnjax.host_allocator) jupyter lab`.
They are not added where `CNNJAX_HOST_ALLOCATOR=0` (the opt-out), where the
user set any of them (their choice stands), or off Linux/glibc; nor, unless
`CNNJAX_HOST_ALLOCATOR=1` asks for them, where a JAX accelerator plugin (CUDA,
ROCm, TPU) is installed: such a process computes on the accelerator, the
settings were measured for XLA:CPU only, and the one GPU run made with them
(`efficientnet_scaling:smoke` on an H100, 16 cores) spent 9 minutes of kernel
time in 2 minutes of wall time without finishing its first trial. `state()`
says whether this process runs with them, and why not.

Cost. The process keeps its peak heap until it exits, as a caching allocator
does (the heap settles after a few steps: 8 calls of a computation with a 64
MiB output), and its threads share one arena's lock, which slowed a
compilation-bound test by 30% (so `make test` opts out). Measured on a 2-core
AMD EPYC (BENCHMARKS.md): experiment trials pinned to one core each trained
1.3-1.5x faster, and `make bench` put 18 of 20 cells at or below 0.9x
PyTorch's step time against 12 without (both frameworks in the same process,
so both ran with the same allocator).
"""

from __future__ import annotations

import os
import pathlib
import platform
import shlex
import sys
from collections.abc import Mapping

from cnnjax import xla_cpu

ENV_OPT_OUT = "CNNJAX_HOST_ALLOCATOR"
SETTINGS = {
    "MALLOC_ARENA_MAX": "1",  # every thread allocates from the main heap, ...
    "MALLOC_MMAP_MAX_": "0",  # ... which grows with brk, never by a fresh mapping, ...
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),  # ... and keeps what is freed for the next step.
}


def supported() -> bool:
  """Linux with glibc: the allocator these settings are for."""
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _requested(env: Mapping[str, str]) -> bool | None:
  """True: asked for; False: opted out; None: not said (on unless an accelerator is installed)."""
  value = env.get(ENV_OPT_OUT, "").strip().lower()
  if value not in xla_cpu.SWITCH_OFF + xla_cpu.SWITCH_ON + ("",):
    raise ValueError(f"{ENV_OPT_OUT}={env[ENV_OPT_OUT]!r} is neither on nor off: set it to 0 "
                     "to start without the allocator settings, or 1 to use them (unset: used "
                     "unless a JAX accelerator plugin is installed)")
  return None if value == "" else value in xla_cpu.SWITCH_ON


def _opted_out(env: Mapping[str, str]) -> bool:
  return _requested(env) is False


def _accelerator_plugins() -> list[str]:
  return xla_cpu.accelerator_plugins()


def _skipped_for_accelerator(env: Mapping[str, str]) -> list[str]:
  """The accelerator plugins that keep the settings off (none where asked for explicitly)."""
  return [] if _requested(env) else _accelerator_plugins()


def child_settings(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """The allocator variables a process started from `env` (default: this one's) should have.

  SETTINGS; the user's own values where `env` sets any of them; nothing where opted out,
  not Linux/glibc, or (unless asked for) where an accelerator plugin is installed.
  """
  env = os.environ if env is None else env
  if not supported() or _opted_out(env) or _skipped_for_accelerator(env):
    return {}
  return {name: env[name] for name in SETTINGS if name in env} or dict(SETTINGS)


def started_with() -> dict[str, str] | None:
  """The SETTINGS variables of the environment this process started with (what glibc read).

  None where that environment cannot be read.
  """
  try:
    raw = pathlib.Path("/proc/self/environ").read_bytes()
  except OSError:
    return None
  initial = dict(entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0")
                 if "=" in entry)
  return {name: initial[name] for name in SETTINGS if name in initial}


def active() -> bool:
  """Whether this process started with every one of SETTINGS."""
  return started_with() == SETTINGS


def state() -> str:
  """"active", or why this process runs without the settings."""
  if active():
    return "active"
  if not supported():
    return "not applicable (not Linux with glibc)"
  if _opted_out(os.environ):
    return f"opted out ({ENV_OPT_OUT}={os.environ[ENV_OPT_OUT]})"
  if plugins := _skipped_for_accelerator(os.environ):
    return (f"not applied: accelerator plugins installed ({', '.join(plugins)}); the settings "
            f"were measured for XLA:CPU only ({ENV_OPT_OUT}=1 applies them)")
  if user := started_with():
    return f"the user's own settings stand ({', '.join(f'{k}={v}' for k, v in user.items())})"
  return ("inactive: this process started without them (start it with "
          "`env $(python -m cnnjax.host_allocator) ...`)")


def reexec() -> None:
  """Executes this process's command again, once, with `child_settings()`.

  For an entry point's first line. Nothing happens where the process already started
  with them (the re-executed one, a `make` target's), where there are none to add, or
  where the starting environment cannot be read.
  """
  wanted, initial = child_settings(), started_with()
  if not wanted or initial is None or initial == wanted:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **wanted})


if __name__ == "__main__":
  # NAME=VALUE words for `env $(python -m cnnjax.host_allocator) COMMAND`; none when opted out.
  print(" ".join(f"{name}={shlex.quote(value)}" for name, value in child_settings().items()))
