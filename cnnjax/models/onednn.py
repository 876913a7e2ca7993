"""oneDNN's convolutions inside XLA:CPU programs: a lowering that the tuning measures.

XLA:CPU's own convolutions reach 150-185 GFLOP/s on the 3x3 layers of ResNet
and DenseNet on a 2-core AMD EPYC, where oneDNN (what PyTorch runs on CPU)
reaches 185-225; and a 7x7 stem over 3 channels ran at half oneDNN's speed
(BENCHMARKS.md). This module makes oneDNN's convolutions callable from jitted
JAX code: `conv` is an NHWC/HWIO convolution whose forward pass, input gradient
and filter gradient are XLA FFI calls into `onednn_conv.cc`, with a
`custom_vjp`. It is one more candidate of `lowering`'s measured choice for
dense convolutions on CPU ("onednn", "onednn_blocked"; see `LAYOUTS`), never a
default: a layer runs it only where this machine's tuning table measured it
faster.

Where it comes from:
- the oneDNN library of the `onednn-cpu-gomp` wheel and the headers of
  `onednn-devel` (`make install` installs both; `pip install cnnjax[onednn]`
  plus `pip install --no-deps onednn-devel` elsewhere);
- XLA's FFI headers from jaxlib (`jax.ffi.include_dir()`);
- a C++17 compiler (`$CXX`, else `g++`), run once per source, jaxlib and oneDNN
  version; the library is kept in `~/.cache/cnnjax/native/` (or
  `$CNNJAX_NATIVE_DIR`) and loaded from there afterwards.

If any is missing, `available()` is False, `unavailable_reason()` says what is
missing, and the lowering simply has no such candidate. `CNNJAX_ONEDNN=0` opts
out (nothing is built, loaded or measured); `1` is the default.

Programs that use it hold custom calls, which only a process that has loaded
the library can run: `register()` loads it, and is called when such a program
is traced or loaded from the step cache (which looks for `TARGET_PREFIX` in it). oneDNN's results differ from
XLA's by float32 rounding (a different summation order), like any two
lowerings; for a given layout, shape and CPU they are the same every run.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("cnnjax")

ENV_SWITCH = "CNNJAX_ONEDNN"
ENV_DIR = "CNNJAX_NATIVE_DIR"
SOURCE = pathlib.Path(__file__).with_name("onednn_conv.cc")
# The lowering's names for oneDNN computing in XLA's NHWC layout (0) or in the blocked
# layouts it prefers, with reorders in and out (1): the attribute `layout` of the calls.
LAYOUTS = {"onednn": 0, "onednn_blocked": 1}
# The FFI targets' names all start with it: a compiled program that holds it calls oneDNN.
TARGET_PREFIX = "cnnjax_onednn_conv_"
_TARGETS = {name: TARGET_PREFIX + name
            for name in ("forward", "input_gradient", "filter_gradient")}


def enabled() -> bool:
  """Whether `CNNJAX_ONEDNN` allows oneDNN (default yes); an unknown value is an error."""
  value = os.environ.get(ENV_SWITCH, "1").strip().lower()
  if value in ("1", "on", "true", "yes", ""):
    return True
  if value in ("0", "off", "false", "no"):
    return False
  raise ValueError(f"{ENV_SWITCH}={os.environ[ENV_SWITCH]!r} is neither on nor off: set it to "
                   f"0 to keep oneDNN out of the lowering, or 1 (the default) to let the "
                   f"tuning measure it")


def _installed_file(distribution: str, suffix: str) -> pathlib.Path | None:
  try:
    dist = importlib.metadata.distribution(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None
  for file in dist.files or ():
    if str(file).endswith(suffix):
      return pathlib.Path(dist.locate_file(file)).resolve()
  return None


class _Build(NamedTuple):
  library: pathlib.Path | None
  reason: str | None  # why there is no library


def _compile(library_file: pathlib.Path, include: pathlib.Path) -> _Build:
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    return _Build(None, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
  root = pathlib.Path(os.environ.get(ENV_DIR) or
                      pathlib.Path.home() / ".cache" / "cnnjax" / "native")
  import jaxlib  # noqa: PLC0415

  identity = "\n".join([SOURCE.read_text(), jaxlib.__version__, str(library_file),
                        str(library_file.stat().st_size), compiler])
  target = root / f"onednn_conv-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
  if target.exists():
    return _Build(target, None)
  try:
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
      built = pathlib.Path(scratch) / target.name
      command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(SOURCE),
                 f"-I{jax.ffi.include_dir()}", f"-I{include}", str(library_file),
                 f"-Wl,-rpath,{library_file.parent}", "-o", str(built)]
      log.info("building cnnjax's oneDNN convolutions: %s", " ".join(command))
      result = subprocess.run(command, capture_output=True, text=True, check=False)
      if result.returncode != 0:
        return _Build(None, f"compiling {SOURCE.name} failed:\n{result.stderr[:2000]}")
      os.replace(built, target)  # atomic: a concurrent build writes the same bytes
  except OSError as error:
    return _Build(None, f"cannot build into {root} ({error}); set {ENV_DIR} to a writable "
                        f"directory")
  return _Build(target, None)


@functools.cache
def _build() -> _Build:
  library_file = _installed_file("onednn-cpu-gomp", "libdnnl.so.3")
  if library_file is None:
    return _Build(None, "the oneDNN library is not installed (pip install onednn-cpu-gomp)")
  header = _installed_file("onednn-devel", "oneapi/dnnl/dnnl.h")
  if header is None:
    return _Build(None, "oneDNN's headers are not installed "
                        "(pip install --no-deps onednn-devel)")
  return _compile(library_file, header.parents[2])


@functools.cache
def _loaded() -> ctypes.CDLL | None:
  build = _build()
  if build.library is None:
    log.info("oneDNN convolutions unavailable: %s", build.reason)
    return None
  library = ctypes.CDLL(str(build.library))
  for name in _TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform="cpu")
  return library


def available() -> bool:
  """Whether oneDNN's convolutions may and can run here (`CNNJAX_ONEDNN` is read each time;
  the library is built and loaded the first time)."""
  return enabled() and _loaded() is not None


def register() -> bool:
  """Loads the library and registers its FFI targets (once), unless opted out; False where
  they are not registered."""
  return available()


def unavailable_reason() -> str | None:
  if not enabled():
    return f"opted out ({ENV_SWITCH}={os.environ[ENV_SWITCH]})"
  return None if available() else _build().reason


def version() -> str | None:
  """The loaded oneDNN's version ("3.2.0"), or None where unavailable."""
  if not available():
    return None
  library = _loaded()
  number = library.cnnjax_onednn_version()
  return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def installed_version() -> str | None:
  """The installed oneDNN wheel's version where oneDNN is enabled, without building or
  loading anything: part of the tuning table's key, read at `import cnnjax`."""
  if not enabled():
    return None
  try:
    return importlib.metadata.version("onednn-cpu-gomp")
  except importlib.metadata.PackageNotFoundError:
    return None


class Geometry(NamedTuple):
  strides: tuple[int, int]
  dilation: tuple[int, int]
  pads: tuple[tuple[int, int], tuple[int, int]]
  layout: int  # a value of LAYOUTS

  def window(self) -> np.ndarray:
    (top, bottom), (left, right) = self.pads
    return np.array([*self.strides, top, bottom, left, right, *self.dilation], np.int64)

  def out_spatial(self, lhs_shape, rhs_shape) -> tuple[int, int]:
    return tuple((lhs_shape[1 + a] + sum(self.pads[a]) - (rhs_shape[a] - 1) * self.dilation[a]
                  - 1) // self.strides[a] + 1 for a in range(2))


def supports(lhs_shape, rhs_shape, pads, dtype) -> bool:
  """Whether `conv` computes this convolution (float32, no group, no cropping pads)."""
  return (np.dtype(dtype) == np.float32 and len(lhs_shape) == 4
          and rhs_shape[2] == lhs_shape[3] and all(p >= 0 for pair in pads for p in pair))


def _call(target: str, shape, geometry: Geometry, a, b):
  if not register():
    raise RuntimeError(f"oneDNN's convolutions are unavailable: {unavailable_reason()}")
  # Under vmap (an ensemble of models, say) the calls run one after another: correct, and
  # no model of cnnjax's own is vmapped.
  return jax.ffi.ffi_call(_TARGETS[target], jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(
      a, b, window=geometry.window(), layout=np.int64(geometry.layout))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x, kernel, geometry: Geometry):
  """NHWC `x` convolved with HWIO `kernel` by oneDNN (float32; see `supports`)."""
  out_h, out_w = geometry.out_spatial(x.shape, kernel.shape)
  return _call("forward", (x.shape[0], out_h, out_w, kernel.shape[3]), geometry, x, kernel)


def _conv_fwd(x, kernel, geometry):
  return conv(x, kernel, geometry), (x, kernel)


def _conv_bwd(geometry, residuals, grad):
  x, kernel = residuals
  grad = grad.astype(jnp.float32)
  return (_call("input_gradient", x.shape, geometry, grad, kernel),
          _call("filter_gradient", kernel.shape, geometry, x, grad))


conv.defvjp(_conv_fwd, _conv_bwd)
