"""How convolutions and max pooling are lowered: XLA's own ops, or on CPU faster equivalents.

Every model builds its convolutions with `Conv` and pools with `max_pool`.
Both choose their lowering for the platform the computation is compiled for,
not the process's default backend: the choice is a `lax.platform_dependent`,
resolved when the computation is lowered, so a CPU process that exports or
jits for a GPU or TPU gets that platform's branch.

On GPU and TPU (and whenever `use("xla")` is active) they are
`lax.conv_general_dilated` and `flax.linen.max_pool` themselves: cuDNN and the
TPU compiler are built around those ops, and no measurement on an accelerator
has shown anything faster (see BENCHMARKS.md for the GPU numbers, when a GPU
was at hand).

XLA:CPU is slow in cases CNNs hit constantly: depthwise convolutions, 3x3
convolutions over tiny maps (a 2x2 map runs 20-80x below the machine's matmul
rate), and its max-pool gradient (select-and-scatter, ~13x slower than the
forward pass). On CPU, `conv_general_dilated` computes what
`lax.conv_general_dilated` computes, lowered per call from static shapes:
- "pointwise": a 1x1 convolution is one 2-D matmul over (batch*positions,
  channels); a strided one takes the strided positions first;
- "im2col" / "im2col_matmul": a kxk convolution whose backward pass gathers
  the k*k shifted (strided) views of the padded input into one (positions,
  k*k*in) patch matrix: the filter gradient is one matmul with it, the input
  gradient a matmul scattered back through the views. In a training step the
  forward pass is XLA's convolution ("im2col") or the patch matrix times the
  kernel ("im2col_matmul");
- "shift_add": a depthwise convolution (one input channel per group) is the
  sum over the k*k window offsets of shifted views times a per-channel weight,
  elementwise work XLA fuses into one loop, with a hand-written backward pass
  (see `_depthwise`);
- "onednn" / "onednn_blocked": oneDNN's convolution (what PyTorch runs on CPU),
  called from the XLA program (`cnnjax.models.onednn`), computing in NHWC or in
  its own blocked layouts; float32 dense convolutions, 1x1 ones too, where the
  library is installed and tuning is on;
- "xla": `lax.conv_general_dilated` itself, for everything else (grouped
  convolutions, input dilation, non-NHWC layouts).

Which of "xla", "im2col", "im2col_matmul" and oneDNN's two a kxk convolution
gets (and whether a 1x1 one is "pointwise" or oneDNN's) depends on the CPU, so
it is measured on the machine at hand, once per layer shape, and kept in a
table keyed by the CPU (`cnnjax.models.tuning`); oneDNN is never a default
and is never chosen unmeasured. That measurement times a training step's
forward pass and gradients. Where nothing differentiates a layer (inference),
its forward pass alone is measured too (`_tuned_forward_choice`), among XLA's
convolution, the patch matrix (a 1x1 layer's matmul) and oneDNN's: an im2col
layer builds its patch matrix for the gradients anyway, so in training its
patch-matrix forward costs little, and the fastest kernel for a pass alone is
not always the one for the three. Without a
measurement (tuning off, a pinned table without the shape, a non-CPU process)
the static heuristic `static_choice` applies, tuned on a 2-core machine with a
67 GFLOP/s matmul peak: im2col up to `IM2COL_MAX_POSITIONS` output positions,
with the patch matrix's forward pass up to 4.

XLA:CPU hands convolutions to the YNNPACK library by default; where XLA's own
are faster (also decided by measurement, `convolution_library`),
`compiler_options("cpu")` keeps them with XLA. cnnjax's steps compile with
those options, and `cnnjax.xla_cpu` sets the same for the whole process, so a
plain `jax.jit` of a model runs the same program.

`max_pool` takes the maximum over the window's shifted views; its gradient
goes to the first maximal element of each window in row-major order, the
element XLA's select-and-scatter picks, so ties (common after a ReLU) are
broken identically.

The mode is read at trace time from a context variable, so `with use("xla"):`
traces the reference computation on every platform. `cnnjax.analysis` traces
that way, so FLOP counts and receptive fields see one convolution primitive
(and pooling window) per layer whatever lowering runs.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from cnnjax.models import onednn, tuning

MODES = ("auto", "xla")
# What `compiler_options` takes: JAX's device platforms and the export platforms.
PLATFORMS = ("cpu", "gpu", "cuda", "rocm", "tpu")

# The static heuristic (`static_choice`): kxk convolutions with at most this many
# output positions run as im2col; above it XLA's own convolution (and its autodiff)
# was as fast or faster on the machine it was measured on.
IM2COL_MAX_POSITIONS = 16
# ... and with at most this many, the patch matrix also computes the forward pass:
# on 4x4 outputs XLA's convolution was faster (4.7 against 7.6 ms, 16x4x4x256 3x3),
# on 2x2 and 1x1 outputs 3-27x slower.
PATCH_FORWARD_MAX_POSITIONS = 4

# XLA:CPU compiler options the lowering's choices were measured under. By default
# XLA:CPU hands convolutions, and dots with the elementwise work around them, to
# the YNNPACK library. Its convolutions are slow here: a 3x3 convolution over a
# 32x32x64 map runs at 30 GFLOP/s where XLA's own reaches 62, and a fused
# BN-ReLU-conv of DenseNet at 12. Dots (alone) and reductions stay with YNNPACK,
# which is faster for them; elementwise work stays with XLA's loop fusion.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# XLA's own default, spelled out (this process's default may have been changed by
# `cnnjax.xla_cpu`): YNNPACK runs convolutions too.
YNNPACK_CONVOLUTION_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}

# A JAX user context, not a plain context variable: it is part of jit's cache keys, so
# the same jitted function traced under another mode is traced again, not reused.
_MODE = jax.make_user_context("auto")


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
  """Within the block, `Conv` and `max_pool` trace with `mode` ("auto" or "xla")."""
  if mode not in MODES:
    raise ValueError(f"unknown convolution lowering {mode!r}; choose one of {MODES}")
  with _MODE(mode):
    yield


def current_mode() -> str:
  return _MODE.value


def compiler_options(platform: str) -> dict:
  """The options to compile cnnjax computations with on `platform` ("cpu", "gpu", ...).

  cnnjax's own train and eval steps pass them. On CPU they keep convolutions
  with XLA unless this machine measured YNNPACK's faster (`convolution_library`).
  """
  if platform not in PLATFORMS:
    raise ValueError(f"unknown platform {platform!r}; choose one of {PLATFORMS}")
  if platform != "cpu":
    return {}
  return dict(CPU_COMPILER_OPTIONS if convolution_library() == "xla"
              else YNNPACK_CONVOLUTION_OPTIONS)


# 3x3 stride-1 convolutions of ResNet's and DenseNet's middle stages at batch 16: where
# the two libraries differ most (XLA's own filter gradient was 2.4x faster on one machine).
_LIBRARY_PROBES = (((16, 32, 32, 64), (3, 3, 64, 64)), ((16, 16, 16, 128), (3, 3, 128, 128)),
                   ((16, 8, 8, 256), (3, 3, 256, 256)))


def convolution_library() -> str:
  """Who runs XLA:CPU's convolutions on this machine, "xla" or "ynnpack" (measured once)."""
  def probes(options):
    def prepare():
      runs = [_compiled_gradient(functools.partial(
          lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC")), lhs, rhs, jnp.float32, options)
          for lhs, rhs in _LIBRARY_PROBES]
      return lambda: [run() for run in runs]
    return prepare

  return tuning.decide("convolution_library",
                       lambda: {"xla": probes(CPU_COMPILER_OPTIONS),
                                "ynnpack": probes(YNNPACK_CONVOLUTION_OPTIONS)},
                       static="xla")


def _compiled_gradient(conv, lhs_shape, rhs_shape, dtype, options):
  """A run of the compiled forward pass and gradient of `conv` (both arguments) on random
  data: what a training step computes of it. The forward value is an output: a convolution
  is linear, so the gradient alone does not need it and XLA would drop it, and the
  candidates differ in their forward pass (a 2x2 map's "im2col", whose XLA forward costs
  0.5 s of a ResNet-18 step at 64 px, measured as fast as the patch-matrix forward)."""
  rng = np.random.default_rng(0)
  x, w = _random_arguments(rng, lhs_shape, rhs_shape, dtype)
  out = jax.eval_shape(conv, x, w)
  cotangent = jnp.asarray(rng.standard_normal(out.shape), out.dtype)
  grad = jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(conv(x, w), cotangent).real, (0, 1)))
  compiled = grad.lower(x, w).compile(compiler_options=options)
  return lambda: jax.block_until_ready(compiled(x, w))


def _random_arguments(rng, lhs_shape, rhs_shape, dtype):
  """An input and a kernel of unit-variance outputs, the data every measurement times."""
  x = jnp.asarray(rng.standard_normal(lhs_shape), dtype)
  w = jnp.asarray(rng.standard_normal(rhs_shape) / np.sqrt(np.prod(rhs_shape[:3])), dtype)
  return x, w


def _explicit_padding(padding, in_spatial, kernel, strides, dilation) -> list[tuple[int, int]]:
  if isinstance(padding, str):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel, dilation)]
    return list(lax.padtype_to_pads(in_spatial, dilated, strides, padding))
  return [tuple(p) for p in padding]


def _nhwc(lhs_shape, rhs_shape, lhs_dilation, dimension_numbers, batch_group_count) -> bool:
  """Whether the CPU lowerings apply: an NHWC/HWIO convolution without input dilation, and
  not in the "xla" mode."""
  nhwc = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return (_MODE.value != "xla" and len(lhs_shape) == 4 and batch_group_count == 1
          and all(d == 1 for d in (lhs_dilation or (1, 1)))
          and lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers) == nhwc)


def choose(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation, rhs_dilation,
           dimension_numbers, feature_group_count: int, batch_group_count: int,
           dtype="float32") -> str:
  """The lowering `conv_general_dilated` uses on CPU for these static arguments."""
  if not _nhwc(lhs_shape, rhs_shape, lhs_dilation, dimension_numbers, batch_group_count):
    return "xla"
  kh, kw, in_per_group, _ = rhs_shape
  in_features = lhs_shape[3]
  if feature_group_count == 1:
    strides, dilation = tuple(window_strides), tuple(rhs_dilation or (1, 1))
    pads = _explicit_padding(padding, lhs_shape[1:3], (kh, kw), strides, dilation)
    return _tuned_dense_choice(tuple(lhs_shape), tuple(rhs_shape), strides, dilation,
                               tuple(map(tuple, pads)), np.dtype(dtype).name)
  if feature_group_count == in_features == rhs_shape[3] and in_per_group == 1:
    return "shift_add"
  return "xla"


DENSE_METHODS = ("xla", "im2col", "im2col_matmul")
# With oneDNN available (`onednn.available()`), its two layouts join every dense layer's
# candidates, 1x1 layers' too: "onednn" and "onednn_blocked".
ONEDNN_METHODS = tuple(onednn.LAYOUTS)


def static_choice(out_positions: int) -> str:
  """The kxk lowering without a measurement, by the number of output positions."""
  if out_positions > IM2COL_MAX_POSITIONS:
    return "xla"
  return "im2col" if out_positions > PATCH_FORWARD_MAX_POSITIONS else "im2col_matmul"


def _layer_name(lhs_shape, rhs_shape, strides, dilation, pads, dtype) -> str:
  """A layer's key in the tuning table."""
  return (f"conv {'x'.join(map(str, lhs_shape))} kernel {'x'.join(map(str, rhs_shape))} "
          f"stride {strides} dilation {dilation} pads {pads} {dtype}")


def _layer_out_spatial(lhs_shape, rhs_shape, strides, dilation, pads) -> tuple[int, int]:
  padded = (lhs_shape[0], *(lhs_shape[1 + a] + sum(pads[a]) for a in range(2)), lhs_shape[3])
  return _out_spatial(padded, rhs_shape[:2], strides, dilation)


def _onednn_methods(lhs_shape, rhs_shape, pads, dtype) -> tuple[str, ...]:
  """oneDNN's candidates for this layer: none where it is unavailable or cannot compute it.
  Only asked while the CPU lowering is chosen, and only where tuning is on."""
  if (tuning.current_mode() == "off" or jax.default_backend() != "cpu"
      or not onednn.supports(lhs_shape, rhs_shape, pads, dtype)):
    return ()
  return ONEDNN_METHODS if onednn.available() else ()


def _tuned_dense_choice(lhs_shape, rhs_shape, strides, dilation, pads, dtype) -> str:
  pointwise = tuple(rhs_shape[:2]) == (1, 1)
  native = _onednn_methods(lhs_shape, rhs_shape, pads, dtype)
  if pointwise and not native:  # one candidate: nothing to measure
    return "pointwise"
  out_h, out_w = _layer_out_spatial(lhs_shape, rhs_shape, strides, dilation, pads)
  name = _layer_name(lhs_shape, rhs_shape, strides, dilation, pads, dtype)
  methods = (("pointwise",) if pointwise else DENSE_METHODS) + native

  def candidates():
    def prepare(method):
      conv = functools.partial(_conv_by, method, strides=strides, dilation=dilation,
                               pads=pads, precision=None, dtype=None)
      return lambda: _compiled_gradient(conv, lhs_shape, rhs_shape, dtype,
                                        compiler_options("cpu"))
    return {method: prepare(method) for method in methods}

  static = "pointwise" if pointwise else static_choice(out_h * out_w)
  return tuning.decide(name, candidates, static=static)


# What computes a convolution's forward pass alone: XLA's convolution, the patch matrix
# times the kernel, one matmul (1x1), oneDNN's.
KXK_FORWARD_METHODS = ("xla", "patch")

# The forward pass each training lowering computes (its choice without a measurement).
_TRAINING_FORWARD = {"xla": "xla", "im2col": "xla", "im2col_matmul": "patch",
                     "pointwise": "pointwise", **{m: m for m in onednn.LAYOUTS}}


def _tuned_forward_choice(method, lhs_shape, rhs_shape, strides, dilation, pads,
                          dtype) -> str:
  """What computes the forward pass where a layer trained by `method` is not differentiated
  (inference), measured alone.

  Differentiated, an im2col layer's patch matrix is built for the gradients anyway, so
  its patch-matrix forward often costs nothing more; alone, XLA's convolution can be
  faster. And a layer whose training step runs best on oneDNN may run its forward alone
  best on another kernel, or the other way round. Without a measurement, or with one
  candidate, it is the training step's own forward.
  """
  static = _TRAINING_FORWARD[method]
  pointwise = tuple(rhs_shape[:2]) == (1, 1)
  native = _onednn_methods(lhs_shape, rhs_shape, pads, dtype)
  if not native and method not in ("im2col", "im2col_matmul"):
    return static  # XLA's convolution or a matmul: no other forward to weigh
  methods = (("pointwise",) if pointwise else KXK_FORWARD_METHODS) + native
  name = "forward " + _layer_name(lhs_shape, rhs_shape, strides, dilation, pads, dtype)

  def candidates():
    def prepare(forward_method):
      forward = functools.partial(_forward_by, forward_method, strides=strides,
                                  dilation=dilation, pads=pads, precision=None)
      return lambda: _compiled_forward(forward, lhs_shape, rhs_shape, dtype,
                                       compiler_options("cpu"))
    return {forward_method: prepare(forward_method) for forward_method in methods}

  return tuning.decide(name, candidates, static=static)


def _compiled_forward(conv, lhs_shape, rhs_shape, dtype, options):
  """A run of the compiled forward pass of `conv` alone on random data: what inference
  computes of it."""
  x, w = _random_arguments(np.random.default_rng(0), lhs_shape, rhs_shape, dtype)
  compiled = jax.jit(conv).lower(x, w).compile(compiler_options=options)
  return lambda: jax.block_until_ready(compiled(x, w))


def _pad_spatial(x, pads, value):
  """NHWC `x` padded on H and W with `value` (negative padding crops, as in convolutions)."""
  if all(tuple(p) == (0, 0) for p in pads):
    return x
  return lax.pad(x, jnp.array(value, x.dtype), [(0, 0, 0), *[(lo, hi, 0) for lo, hi in pads],
                                                (0, 0, 0)])


def _out_spatial(padded_shape, kernel, strides, dilation) -> tuple[int, int]:
  return tuple((padded_shape[1 + a] - (kernel[a] - 1) * dilation[a] - 1) // strides[a] + 1
               for a in range(2))


def _windows(x, kernel, strides, dilation, out_spatial) -> list[jax.Array]:
  """The kh*kw shifted, strided views of padded NHWC `x`, each (N, Ho, Wo, C)."""
  (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, strides, dilation, out_spatial
  views = []
  for i in range(kh):
    for j in range(kw):
      start = (0, i * dh, j * dw, 0)
      limit = (x.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, x.shape[3])
      views.append(lax.slice(x, start, limit, (1, sh, sw, 1)))
  return views


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
  """`lax.conv_general_dilated` with the same signature: on CPU lowered as `choose` says."""
  reference = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, batch_group_count=batch_group_count,
      precision=precision, preferred_element_type=preferred_element_type)
  dtype = jnp.result_type(lhs, rhs)
  method = choose(lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
                  dimension_numbers, feature_group_count, batch_group_count, dtype)
  dense = (feature_group_count == 1 and
           _nhwc(lhs.shape, rhs.shape, lhs_dilation, dimension_numbers, batch_group_count))
  if method == "xla" and not dense:
    return reference(lhs, rhs)
  kh, kw = rhs.shape[:2]
  strides, dilation = tuple(window_strides), tuple(rhs_dilation or (1, 1))
  pads = tuple(map(tuple, _explicit_padding(padding, lhs.shape[1:3], (kh, kw), strides,
                                            dilation)))
  training_forward = _TRAINING_FORWARD.get(method)  # None: depthwise, no other forward
  inference = training_forward and _tuned_forward_choice(
      method, tuple(lhs.shape), tuple(rhs.shape), strides, dilation, pads, np.dtype(dtype).name)
  if method == "xla" and inference == "xla":
    return reference(lhs, rhs)
  if inference == training_forward:
    cpu = functools.partial(_conv_by, method, strides=strides, dilation=dilation, pads=pads,
                            precision=precision, dtype=preferred_element_type)
  else:
    def cpu(lhs, rhs):
      out = _trained_and_inferred(lhs, rhs, _Lowering(method, inference, strides, dilation,
                                                      pads, precision))
      return out if preferred_element_type is None else out.astype(preferred_element_type)
  return lax.platform_dependent(lhs, rhs, cpu=cpu, default=reference)


class _Lowering(NamedTuple):
  """A layer whose training step and inference compute its forward pass differently."""
  training: str     # a method of `choose`
  inference: str    # a forward method (see `_tuned_forward_choice`)
  strides: tuple[int, int]
  dilation: tuple[int, int]
  pads: tuple[tuple[int, int], tuple[int, int]]
  precision: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _trained_and_inferred(lhs, rhs, lowering: _Lowering):
  """Not differentiated: the inference forward. Differentiated: the training lowering's
  forward pass and gradients (`_conv_by`)."""
  return _forward_by(lowering.inference, lhs, rhs, strides=lowering.strides,
                     dilation=lowering.dilation, pads=lowering.pads,
                     precision=lowering.precision)


def _trained_and_inferred_fwd(lhs, rhs, lowering):
  return jax.vjp(functools.partial(_conv_by, lowering.training, strides=lowering.strides,
                                   dilation=lowering.dilation, pads=lowering.pads,
                                   precision=lowering.precision, dtype=None), lhs, rhs)


def _trained_and_inferred_bwd(lowering, vjp, grad):
  return vjp(grad)


_trained_and_inferred.defvjp(_trained_and_inferred_fwd, _trained_and_inferred_bwd)


def _forward_by(method: str, lhs, rhs, *, strides, dilation, pads, precision) -> jax.Array:
  """A convolution's forward pass alone by a forward method: "patch" (the patch matrix
  times the kernel), or a method of `_conv_by` ("xla", "pointwise", oneDNN's)."""
  if method != "patch":
    return _conv_by(method, lhs, rhs, strides=strides, dilation=dilation, pads=pads,
                    precision=precision, dtype=None)
  padded = _pad_spatial(lhs, pads, 0)
  geometry = _Geometry(tuple(rhs.shape[:2]), strides, dilation,
                       _out_spatial(padded.shape, rhs.shape[:2], strides, dilation), precision,
                       xla_forward=False)
  return _dense_forward(padded, rhs, geometry, xla_forward=False)


def _conv_by(method: str, lhs, rhs, *, strides, dilation, pads, precision, dtype) -> jax.Array:
  """An NHWC/HWIO convolution with explicit padding, computed by `method` (see `choose`):
  its forward pass and gradients as a training step takes them."""
  kh, kw, in_per_group, out_features = rhs.shape
  if method == "xla":
    return lax.conv_general_dilated(lhs, rhs, strides, pads, rhs_dilation=dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision, preferred_element_type=dtype)
  if method in onednn.LAYOUTS:
    out = onednn.conv(lhs, rhs, onednn.Geometry(strides, dilation, pads, onednn.LAYOUTS[method]))
    return out if dtype is None else out.astype(dtype)
  if method == "shift_add":
    out = _depthwise(lhs, rhs, _DepthwiseGeometry(strides, dilation, pads))
    return out if dtype is None else out.astype(dtype)
  padded = _pad_spatial(lhs, pads, 0)
  out_spatial = _out_spatial(padded.shape, (kh, kw), strides, dilation)
  if method == "pointwise":
    columns = _windows(padded, (1, 1), strides, dilation, out_spatial)[0]
    return _matmul(columns, rhs.reshape(in_per_group, out_features), precision, dtype)
  geometry = _Geometry((kh, kw), strides, dilation, out_spatial, precision,
                       xla_forward=method == "im2col")
  out = _dense_conv(padded, rhs, geometry)
  return out if dtype is None else out.astype(dtype)


class _DepthwiseGeometry(NamedTuple):
  strides: tuple[int, int]
  dilation: tuple[int, int]
  pads: tuple[tuple[int, int], tuple[int, int]]


def _shift_add(padded, kernel, strides, dilation, out_spatial):
  """Sum over the window offsets of the shifted views times the per-channel weights."""
  kh, kw = kernel.shape[:2]
  views = _windows(padded, (kh, kw), strides, dilation, out_spatial)
  weights = kernel.reshape(kh * kw, kernel.shape[-1])
  out = views[0] * weights[0]
  for view, weight in zip(views[1:], weights[1:]):
    out = out + view * weight
  return out


# Rows summed by explicit adds before the reduction of a depthwise filter gradient;
# 8 measured fastest (4: 2x slower, 16: 3.5x, the fusion splits).
_DEPTHWISE_ROW_CHUNK = 8


def _row_chunks(rows: int) -> int:
  return max(d for d in range(1, _DEPTHWISE_ROW_CHUNK + 1) if rows % d == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise(x, kernel, geometry: _DepthwiseGeometry):
  """A depthwise convolution of NHWC `x` as a shift-and-add of the padded input's views.

  Plain autodiff of the shift-and-add stores every view for the filter
  gradient and hands XLA:CPU one reduction per view, which it runs as a
  library call over a materialised copy of the view: 3x slower than PyTorch
  on a 3x3 stride-1 layer. The backward pass here keeps only `x`; the filter
  gradient first sums each view-times-gradient product over groups of rows
  with elementwise adds, which XLA fuses with the views into one loop, and
  reduces the (rows/chunk)-times-smaller result; the input gradient is a
  shift-and-add over the stride-dilated, padded output gradient with the
  flipped kernel.
  """
  padded = _pad_spatial(x, geometry.pads, 0)
  out_spatial = _out_spatial(padded.shape, kernel.shape[:2], geometry.strides, geometry.dilation)
  return _shift_add(padded, kernel, geometry.strides, geometry.dilation, out_spatial)


def _depthwise_fwd(x, kernel, geometry):
  return _depthwise(x, kernel, geometry), (x, kernel)


def _depthwise_bwd(geometry, residuals, grad):
  x, kernel = residuals
  kh, kw, _, channels = kernel.shape
  batch, out_h, out_w, _ = grad.shape
  padded = _pad_spatial(x, geometry.pads, 0)
  views = _windows(padded, (kh, kw), geometry.strides, geometry.dilation, (out_h, out_w))
  chunk = _row_chunks(out_h)

  def row_chunk_sum(product):
    rows = product.reshape(batch, out_h // chunk, chunk, out_w, channels)
    return functools.reduce(jnp.add, [rows[:, :, r] for r in range(chunk)])

  partial = jnp.stack([row_chunk_sum(view * grad) for view in views])
  grad_kernel = jnp.sum(partial.reshape(kh * kw, -1, channels), axis=1).reshape(kernel.shape)

  # The transpose of a strided, padded window: dilate the gradient by the stride
  # (interior padding) and pad it so the flipped kernel's views land on x.
  config = [(0, 0, 0)]
  for axis, size in enumerate((kh, kw)):
    reach = (size - 1) * geometry.dilation[axis]
    before = reach - geometry.pads[axis][0]
    dilated = (grad.shape[1 + axis] - 1) * geometry.strides[axis] + 1
    config.append((before, x.shape[1 + axis] + reach - dilated - before,
                   geometry.strides[axis] - 1))
  config.append((0, 0, 0))
  grad_padded = lax.pad(grad, jnp.array(0, grad.dtype), config)
  grad_x = _shift_add(grad_padded, kernel[::-1, ::-1], (1, 1), geometry.dilation, x.shape[1:3])
  return grad_x, grad_kernel.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


class _Geometry(NamedTuple):
  kernel: tuple[int, int]
  strides: tuple[int, int]
  dilation: tuple[int, int]
  out_spatial: tuple[int, int]
  precision: Any
  xla_forward: bool  # XLA's convolution computes the forward pass, else the patch matrix


def _matmul(rows, matrix, precision, dtype=None):
  """(N, H, W, K) times (K, O): one 2-D matmul over the flattened positions.

  Written in 2-D so that its autodiff transpose, the weight gradient
  (positions, K)^T (positions, O), contracts a single dimension. Contracting
  (N, H, W) as three dimensions makes XLA:CPU transpose the whole gradient
  first, which measured 3x slower for a 1x1 convolution's backward pass.
  """
  flat = lax.dot_general(rows.reshape(-1, rows.shape[-1]), matrix, (((1,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=dtype)
  return flat.reshape(*rows.shape[:-1], matrix.shape[-1])


def _im2col(padded, geometry: _Geometry):
  # (N, Ho, Wo, kh*kw*C) ordered (i, j, c), the row-major order of the HWIO kernel.
  return jnp.concatenate(_windows(padded, geometry.kernel, geometry.strides, geometry.dilation,
                                  geometry.out_spatial), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_conv(padded, kernel, geometry: _Geometry):
  """A kxk convolution of pre-padded NHWC input; the backward pass is always im2col.

  On these small maps XLA:CPU's gradients are its slowest convolutions (a 3x3
  stride-2 layer from 4x4 to 2x2 x512: 71 ms against 6 ms), so both gradients
  come from the patch matrix whatever computed the forward pass.

  `geometry.xla_forward` says what computes the forward pass of a training step; where
  nothing differentiates the layer, `_tuned_forward_choice` picks its forward anew.
  """
  return _dense_forward(padded, kernel, geometry, geometry.xla_forward)


def _dense_forward(padded, kernel, geometry: _Geometry, xla_forward: bool):
  if xla_forward:
    return lax.conv_general_dilated(padded, kernel, geometry.strides, "VALID",
                                    rhs_dilation=geometry.dilation,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=geometry.precision)
  kh, kw, in_features, out_features = kernel.shape
  return _matmul(_im2col(padded, geometry), kernel.reshape(kh * kw * in_features, out_features),
                 geometry.precision)


def _dense_conv_fwd(padded, kernel, geometry):
  return _dense_forward(padded, kernel, geometry, geometry.xla_forward), (padded, kernel)


def _dense_conv_bwd(geometry, residuals, grad):
  padded, kernel = residuals
  kh, kw, in_features, out_features = kernel.shape
  columns, columns_transpose = jax.vjp(lambda p: _im2col(p, geometry), padded)
  flat_kernel = kernel.reshape(kh * kw * in_features, out_features)
  # Single-dimension contractions over flattened positions: see `_matmul`.
  grad_kernel = lax.dot_general(columns.reshape(-1, columns.shape[-1]),
                                grad.reshape(-1, out_features), (((0,), (0,)), ((), ())),
                                precision=geometry.precision)
  grad_columns = _matmul(grad, flat_kernel.T, geometry.precision)
  (grad_padded,) = columns_transpose(grad_columns)
  return grad_padded, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(padded, window, strides, out_spatial):
  return functools.reduce(jnp.maximum, _windows(padded, window, strides, (1, 1), out_spatial))


def _max_pool_fwd(padded, window, strides, out_spatial):
  out = _max_pool(padded, window, strides, out_spatial)
  return out, (padded, out)


def _max_pool_bwd(window, strides, out_spatial, residuals, grad):
  padded, out = residuals
  views, transpose = jax.vjp(lambda p: _windows(p, window, strides, (1, 1), out_spatial), padded)
  unclaimed = jnp.ones(out.shape, bool)
  contributions = []
  for view in views:
    first = unclaimed & (view == out)
    unclaimed = unclaimed & ~first
    contributions.append(jnp.where(first, grad, jnp.zeros_like(grad)))
  return transpose(contributions)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int],
             padding: Sequence[tuple[int, int]]) -> jax.Array:
  """`flax.linen.max_pool` on NHWC with explicit (-inf) padding, lowered as the mode says."""
  window, strides, padding = tuple(window), tuple(strides), [tuple(p) for p in padding]
  reference = functools.partial(nn.max_pool, window_shape=window, strides=strides,
                                padding=padding)
  if _MODE.value == "xla" or x.ndim != 4:
    return reference(x)

  def cpu(x):
    padded = _pad_spatial(x, padding, -jnp.inf)
    return _max_pool(padded, window, strides, _out_spatial(padded.shape, window, strides, (1, 1)))

  return lax.platform_dependent(x, cpu=cpu, default=reference)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
Conv.__doc__ = "`flax.linen.Conv` lowered by `cnnjax.models.lowering.conv_general_dilated`."
