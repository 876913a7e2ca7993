"""Building blocks shared by the model families.

Pooling with PyTorch semantics (ceil mode, adaptive average pooling), local
response normalization, squeeze-excite, stochastic depth, the initializers of
the original papers/implementations, and the input-size guard every model
calls first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.models import lowering

ModuleDef = Any
Array = jax.Array

# torchvision's initializers, written as Flax initializers.
# Conv: kaiming_normal_(mode='fan_out', nonlinearity='relu').
torch_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch default for Linear and Conv: kaiming_uniform_(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def tf_efficientnet_conv_init(key, shape, dtype=jnp.float32):
  """normal(0, sqrt(2 / fan_out)), fan_out = kh * kw * out as the TF original.

  For a depthwise kernel Flax stores (kh, kw, 1, C) while TF stores
  (kh, kw, C, 1) and takes out = 1; both give fan_out = kh * kw * shape[-2]
  for depthwise, so the depthwise case is recognised by shape[-2] == 1.
  """
  kh, kw, fan_in_per_group, out = shape
  out_filters = 1 if fan_in_per_group == 1 and out > 1 else out
  std = math.sqrt(2.0 / (kh * kw * out_filters))
  return std * jax.random.normal(key, shape, dtype)


def tf_efficientnet_dense_init(key, shape, dtype=jnp.float32):
  """U(+-1/sqrt(units)) with units = number of outputs, as the TF original."""
  limit = 1.0 / math.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -limit, limit)


class InputTooSmallError(ValueError):
  """An image smaller than an architecture can process."""


def require_input_size(x: Array, minimum: int, model: str) -> None:
  """Fails with the smallest working size when a feature map would vanish."""
  if x.ndim != 4:
    raise ValueError(
        f"{model} expects NHWC images of rank 4, got shape {tuple(x.shape)}; "
        "add a batch axis (x[None]) for a single image.")
  height, width = x.shape[1], x.shape[2]
  if min(height, width) < minimum:
    raise InputTooSmallError(
        f"{model} cannot process {height}x{width} inputs: a feature map would "
        f"become empty. The smallest input that works is {minimum}x{minimum}; "
        f"resize the images to at least {minimum} pixels (config: image_size).")


def _ceil_pool_padding(size: int, window: int, stride: int, pad: int) -> tuple[int, int]:
  """PyTorch ceil_mode output arithmetic expressed as (low, high) padding."""
  out = math.ceil((size + 2 * pad - window) / stride) + 1
  # PyTorch drops a last window that would start in the right padding.
  if (out - 1) * stride >= size + pad:
    out -= 1
  high = max((out - 1) * stride + window - size - pad, 0)
  return pad, high


def max_pool(x: Array, window: int, stride: int, padding: int = 0,
             ceil_mode: bool = False) -> Array:
  """torch.nn.MaxPool2d on NHWC: symmetric -inf padding, optional ceil mode."""
  if ceil_mode:
    pads = tuple(_ceil_pool_padding(s, window, stride, padding) for s in x.shape[1:3])
  else:
    pads = ((padding, padding), (padding, padding))
  return lowering.max_pool(x, (window, window), (stride, stride), pads)


def avg_pool(x: Array, window: int, stride: int) -> Array:
  """Unpadded average pooling (DenseNet transitions)."""
  return nn.avg_pool(x, (window, window), (stride, stride), padding="VALID")


def _adaptive_bins(size: int, out: int) -> list[tuple[int, int]]:
  return [(math.floor(i * size / out), math.ceil((i + 1) * size / out)) for i in range(out)]


def adaptive_avg_pool(x: Array, output_size: int) -> Array:
  """torch.nn.AdaptiveAvgPool2d on NHWC, bins floor(i*n/o) .. ceil((i+1)*n/o).

  Written with slices and means rather than a pooling matrix so that FLOP
  counting sees no matmul (the reference counts pooling as free).
  """
  for axis in (1, 2):
    size = x.shape[axis]
    if size == output_size:
      continue
    if size % output_size == 0:
      k = size // output_size
      shape = x.shape[:axis] + (output_size, k) + x.shape[axis + 1:]
      x = x.reshape(shape).mean(axis=axis + 1)
      continue
    pieces = [
        jax.lax.slice_in_dim(x, start, stop, axis=axis).mean(axis=axis, keepdims=True)
        for start, stop in _adaptive_bins(size, output_size)
    ]
    x = jnp.concatenate(pieces, axis=axis)
  return x


def global_avg_pool(x: Array) -> Array:
  return x.mean(axis=(1, 2))


class LocalResponseNorm(nn.Module):
  """Krizhevsky et al. (2012) LRN across channels.

  b = a / (k + alpha * sum_{|j-i| <= n//2} a_j^2) ** beta, with alpha applied to
  the plain sum as in the paper (PyTorch's LocalResponseNorm divides alpha by n).
  """
  size: int = 5
  alpha: float = 1e-4
  beta: float = 0.75
  k: float = 2.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    half = self.size // 2
    squared = jnp.square(x.astype(jnp.float32))
    window_sum = jax.lax.reduce_window(
        squared, 0.0, jax.lax.add,
        window_dimensions=(1, 1, 1, self.size), window_strides=(1, 1, 1, 1),
        padding=((0, 0), (0, 0), (0, 0), (half, self.size - 1 - half)))
    scale = (self.k + self.alpha * window_sum) ** self.beta
    return (x / scale).astype(x.dtype)


class StochasticDepth(nn.Module):
  """Drops the residual branch per sample with probability `rate` in training.

  Survivors are divided by the keep probability so the expectation is
  unchanged (Huang et al. 2016; "drop connect" in the EfficientNet code).
  """
  rate: float

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    rng = self.make_rng("dropout")
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class SqueezeExcite(nn.Module):
  """Hu et al. (2018) channel gating as EfficientNet uses it (1x1 convs with bias)."""
  reduced_features: int
  conv: ModuleDef
  activation: Callable[[Array], Array] = nn.swish
  gate: Callable[[Array], Array] = nn.sigmoid

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = x.mean(axis=(1, 2), keepdims=True)
    scale = self.conv(self.reduced_features, (1, 1), use_bias=True, name="reduce")(scale)
    scale = self.activation(scale)
    scale = self.conv(x.shape[-1], (1, 1), use_bias=True, name="expand")(scale)
    return x * self.gate(scale)


def symmetric_padding(kernel: int, dilation: int = 1) -> Sequence[tuple[int, int]]:
  """PyTorch's `padding=k//2` for odd kernels, as explicit Flax padding."""
  pad = dilation * (kernel - 1) // 2
  return ((pad, pad), (pad, pad))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Round channels to a multiple of `divisor`, never below 90% of `value`.

  The rule shared by MobileNet v2 (`_make_divisible`) and EfficientNet
  (`round_filters`).
  """
  min_value = divisor if min_value is None else min_value
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return int(rounded)
