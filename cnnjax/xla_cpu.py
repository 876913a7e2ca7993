"""The one process-wide setting cnnjax makes: XLA:CPU keeps convolutions with XLA.

Why. A plain `jax.jit` of a model compiles with XLA's default options, and by
default XLA:CPU hands convolutions to the YNNPACK library, whose filter
gradients measured 2-2.4x slower than XLA's own here (a ResNet-18 training
step 12-25% slower than cnnjax's own). Compiler options are per compile, so
cnnjax's steps pass `lowering.compiler_options("cpu")`; the only way to give
a user's own `jax.jit` the same is the `XLA_FLAGS` variable, which XLA reads
once, when JAX's backends start.

What. `import cnnjax` calls `apply()`, which appends `FLAG` to `XLA_FLAGS`:
XLA's default list of YNNPACK fusions (dots, reductions, convolutions) less
convolutions. A program without convolutions compiles exactly as before
(tests/test_xla_cpu.py compares the compiled programs), so other JAX code in
the process is untouched, and a program with convolutions is compiled exactly
as cnnjax's own steps compile it. It is applied only when all of these hold,
and `state()` says which did not:

- JAX's backends have not started (otherwise a warning names the fix:
  import cnnjax before the first computation, or set `XLA_FLAGS` yourself);
- `CNNJAX_XLA_FLAGS` is not `0`, `off`, `false` or `no` (the opt-out; a value
  that is neither on nor off warns and counts as on);
- `XLA_FLAGS` does not already set that option (the user's choice stands);
- no accelerator plugin (CUDA, ROCm, TPU) is installed: such a process runs
  its models on the accelerator, and a flag unknown to its jaxlib would stop it;
- this machine's tuning table has not measured YNNPACK's convolutions faster
  (`lowering.convolution_library`).

`restore()` takes `FLAG` out of `XLA_FLAGS` again: it takes effect for backends
not yet started and for child processes.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import re
import warnings

ENV_OPT_OUT = "CNNJAX_XLA_FLAGS"
# The flag that forces XLA:CPU's host device count: it decides which devices exist, not what
# a program compiled for some of them computes.
FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=\d+")
OPTION = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{OPTION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"

_state = {"state": "not applied yet"}
# How cnnjax's on/off environment variables (this one, CNNJAX_HOST_ALLOCATOR) are read.
SWITCH_OFF, SWITCH_ON = ("0", "off", "false", "no"), ("1", "on", "true", "yes")


def state() -> str:
  """What `apply` did: "applied", or why not."""
  return _state["state"]


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # noqa: PLC0415
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a JAX without it: assume the worst, touch nothing
    return True


def accelerator_plugins() -> list[str]:
  """JAX plugins for an accelerator (CUDA, ROCm, TPU) installed in this environment."""
  plugins = []
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins  # noqa: PLC0415

    plugins = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  if importlib.util.find_spec("libtpu") is not None:
    plugins.append("libtpu")
  return plugins


def apply() -> str:
  """Appends `FLAG` to `XLA_FLAGS` where the module docstring's conditions hold; the state."""
  if _state["state"] == "applied":
    return state()
  flags = os.environ.get("XLA_FLAGS", "")
  opt_out = os.environ.get(ENV_OPT_OUT, "").strip().lower()
  if opt_out not in SWITCH_OFF + SWITCH_ON + ("",):
    # Not an error: this runs at `import cnnjax`, which a typo must not break.
    warnings.warn(f"{ENV_OPT_OUT}={os.environ[ENV_OPT_OUT]!r} is neither on nor off, so cnnjax "
                  f"treats it as on; set it to 0 to leave XLA_FLAGS alone, or unset it.",
                  stacklevel=3)
  if opt_out in SWITCH_OFF:
    reason = f"opted out ({ENV_OPT_OUT}={os.environ[ENV_OPT_OUT]})"
  elif OPTION in flags:
    reason = "XLA_FLAGS already sets it"
  elif plugins := accelerator_plugins():
    reason = f"accelerator plugins installed ({', '.join(plugins)})"
  elif _measured_ynnpack_faster():
    reason = "this machine measured YNNPACK's convolutions faster"
  elif _backends_started():
    reason = "JAX's backends had started"
    import jax  # noqa: PLC0415

    if jax.default_backend() == "cpu":
      warnings.warn(
          "JAX's backends started before cnnjax was imported, so a plain jax.jit of a cnnjax "
          "model hands its convolutions to YNNPACK (slower training steps on CPU; cnnjax's own "
          f"steps are unaffected). Import cnnjax before the first JAX computation, or start "
          f"Python with XLA_FLAGS='{FLAG}'. {ENV_OPT_OUT}=0 silences this.", stacklevel=3)
  else:
    os.environ["XLA_FLAGS"] = f"{flags} {FLAG}".strip()
    reason = "applied"
  _state["state"] = reason
  return reason


def restore() -> None:
  """Takes `FLAG` out of `XLA_FLAGS` again (for backends not yet started, children)."""
  if _state["state"] != "applied":
    return
  # Only FLAG goes: what was appended after it (the allocator's heap size) stays.
  flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f != FLAG)
  if flags:
    os.environ["XLA_FLAGS"] = flags
  else:
    os.environ.pop("XLA_FLAGS", None)
  _state["state"] = "restored"


def _measured_ynnpack_faster() -> bool:
  from cnnjax.models import tuning  # noqa: PLC0415

  try:
    return tuning.lookup("convolution_library") == "ynnpack"
  except Exception as error:  # noqa: BLE001 - a table problem never stops an import
    warnings.warn(f"cnnjax: the tuning table could not be read ({error})", stacklevel=3)
    return False
