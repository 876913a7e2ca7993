"""One generic network for the mobile families: MobileNet v1/v2 and EfficientNet.

A stem convolution, a list of blocks decoded from stage strings
(`cnnjax.models.blockspec`), an optional 1x1 head convolution, global pooling,
dropout and a classifier. The variants differ only in data and injected
pieces: stage strings, activation, padding convention, BatchNorm constants and
initialisers.

Blocks:
- `ds` depthwise-separable (MobileNet v1): depthwise kxk + BN + act, then
  pointwise 1x1 + BN + act. With `separable=False` the same stage becomes a
  standard kxk convolution, the baseline of MobileNet's cost comparison.
- `mb` inverted residual / MBConv (MobileNet v2, EfficientNet): 1x1 expansion
  (skipped at ratio 1), depthwise kxk, optional squeeze-excite, linear 1x1
  projection, identity shortcut with stochastic depth when shapes allow.
  `zero_init_residual` starts the projection's BatchNorm scale at 0 in the
  blocks that have the shortcut, so each starts as the identity and a deeper
  network starts as the shallower one; blocks without a shortcut keep the
  reference initialisation (zeroed, they would pass nothing on).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.models import blockspec, common, lowering
from cnnjax.models.batchnorm import BatchNorm

ModuleDef = common.ModuleDef


def _padding(mode: str, kernel: int):
  if mode == "SAME":
    return "SAME"
  if mode == "symmetric":
    return common.symmetric_padding(kernel)
  raise ValueError(f"padding mode must be 'SAME' (TensorFlow) or 'symmetric' (PyTorch), got {mode!r}")


class SeparableBlock(nn.Module):
  spec: blockspec.BlockSpec
  separable: bool
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable
  padding: str

  @nn.compact
  def __call__(self, x, train: bool):
    spec = self.spec
    pad = _padding(self.padding, spec.kernel)
    if not self.separable:
      x = self.conv(spec.out_features, (spec.kernel, spec.kernel), spec.stride, padding=pad,
                    name="conv")(x)
      return self.activation(self.norm(name="bn")(x, use_running_average=not train))
    x = self.conv(spec.in_features, (spec.kernel, spec.kernel), spec.stride, padding=pad,
                  feature_group_count=spec.in_features, name="depthwise")(x)
    x = self.activation(self.norm(name="bn_dw")(x, use_running_average=not train))
    x = self.conv(spec.out_features, (1, 1), padding="VALID", name="pointwise")(x)
    return self.activation(self.norm(name="bn_pw")(x, use_running_average=not train))


class MBConvBlock(nn.Module):
  spec: blockspec.BlockSpec
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable
  padding: str
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    spec = self.spec
    inputs = x
    has_shortcut = spec.stride == 1 and spec.in_features == spec.out_features
    hidden = int(round(spec.in_features * spec.expand_ratio))
    if spec.expand_ratio != 1:
      x = self.conv(hidden, (1, 1), padding="VALID", name="expand")(x)
      x = self.activation(self.norm(name="bn_expand")(x, use_running_average=not train))
    x = self.conv(hidden, (spec.kernel, spec.kernel), spec.stride,
                  padding=_padding(self.padding, spec.kernel), feature_group_count=hidden,
                  name="depthwise")(x)
    x = self.activation(self.norm(name="bn_dw")(x, use_running_average=not train))
    if spec.se_ratio > 0:
      # The squeeze width comes from the block's input channels, as the original.
      reduced = max(1, int(spec.in_features * spec.se_ratio))
      x = common.SqueezeExcite(reduced, conv=self.conv, activation=self.activation, name="se")(x)
    x = self.conv(spec.out_features, (1, 1), padding="VALID", name="project")(x)
    zeroed = self.zero_init_residual and has_shortcut
    x = self.norm(scale_init=nn.initializers.zeros if zeroed else nn.initializers.ones,
                  name="bn_project")(x, use_running_average=not train)
    if has_shortcut:
      x = common.StochasticDepth(spec.drop_path, name="drop_path")(x, train)
      x = x + inputs
    return x


class MobileConvNet(nn.Module):
  """Stem, decoded blocks, optional head conv, pool, dropout, classifier."""
  stages: Sequence[str]
  num_classes: int = 1000
  width: float = 1.0
  depth: float = 1.0
  stem_features: int = 32
  head_features: int | None = 1280
  # The head is scaled by max(width, head_min_width) (MobileNet v2 never shrinks it).
  head_min_width: float = 0.0
  # Channels are rounded to multiples of this (8 in every reference). A small network scaled
  # in fine steps (a compound-scaling sweep at width 0.25) needs a finer grid to follow its
  # coefficients: 1 rounds to the nearest channel.
  channel_divisor: int = 8
  dropout: float = 0.2
  drop_path: float = 0.0
  separable: bool = True
  # Residual MBConv blocks start as the identity (see MBConvBlock); off in every reference.
  zero_init_residual: bool = False
  padding: str = "SAME"
  activation: Callable = nn.swish
  conv: ModuleDef = lowering.Conv
  norm: ModuleDef = functools.partial(BatchNorm, momentum=0.99, epsilon=1e-3)
  kernel_init: Callable = common.tf_efficientnet_conv_init
  dense_init: Callable = common.tf_efficientnet_dense_init
  # The resolution the variant was designed for (informational; see `input_size`).
  resolution: int | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def __post_init__(self):
    for name in ("width", "depth"):
      value = getattr(self, name)
      if not value > 0:
        raise ValueError(f"{name} multiplier must be positive, got {value!r}")
    if not (isinstance(self.channel_divisor, int) and self.channel_divisor >= 1):
      raise ValueError(f"channel_divisor must be a positive integer, got {self.channel_divisor!r}")
    for name in ("dropout", "drop_path"):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    _padding(self.padding, 3)
    super().__post_init__()

  @property
  def blocks(self) -> list[blockspec.BlockSpec]:
    return blockspec.expand_stages(self.stages, self.stem_features, self.width, self.depth,
                                   self.drop_path, divisor=self.channel_divisor)

  @property
  def input_size(self) -> int:
    """The designed resolution, or the one compound scaling pairs with width/depth."""
    if self.resolution is not None:
      return self.resolution
    return blockspec.default_resolution(self.width, self.depth)

  @property
  def min_input_size(self) -> int:
    # Every convolution here is padded, so maps never become empty.
    return 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    common.require_input_size(x, self.min_input_size, type(self).__name__)
    conv = functools.partial(self.conv, use_bias=False, kernel_init=self.kernel_init,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    blocks = self.blocks
    x = conv(blockspec.round_filters(self.stem_features, self.width, self.channel_divisor), (3, 3), 2,
             padding=_padding(self.padding, 3), name="stem")(x)
    x = self.activation(norm(name="bn_stem")(x, use_running_average=not train))
    for index, spec in enumerate(blocks):
      if spec.kind == "mb":
        block = MBConvBlock(spec, conv, norm, self.activation, self.padding,
                            zero_init_residual=self.zero_init_residual, name=f"block{index}")
      else:
        block = SeparableBlock(spec, self.separable and spec.kind == "ds", conv, norm,
                               self.activation, self.padding, name=f"block{index}")
      x = block(x, train)
    if self.head_features:
      head = blockspec.round_filters(self.head_features, max(self.width, self.head_min_width),
                                     self.channel_divisor)
      x = conv(head, (1, 1), padding="VALID", name="head")(x)
      x = self.activation(norm(name="bn_head")(x, use_running_average=not train))
    x = common.global_avg_pool(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=self.dense_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="classifier")(x)

