"""ResNet-18/34/50/101/152 (He et al. 2016) in torchvision's layout.

Basic and bottleneck blocks, the stride in the bottleneck's 3x3 convolution
("v1.5", as torchvision), projection shortcuts (1x1 conv + BN) where the shape
changes, and `zero_init_residual` (torchvision's name; timm's `zero_init_last`): the last
BatchNorm scale of each residual branch starts at 0, so every block starts as its shortcut
(Goyal et al. 2017). Off by default, so that torchvision's initialisation is kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.models import common, lowering
from cnnjax.models.batchnorm import BatchNorm
from cnnjax.registry import register_model

ModuleDef = common.ModuleDef


class BasicBlock(nn.Module):
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable
  zero_init_residual: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = self.conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
    y = self.activation(self.norm(name="bn1")(y, use_running_average=not train))
    y = self.conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name="bn2")(y, use_running_average=not train)
    if residual.shape != y.shape:
      residual = self.conv(self.features, (1, 1), self.strides, padding="VALID", name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual, use_running_average=not train)
    return self.activation(y + residual)


class Bottleneck(nn.Module):
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable
  zero_init_residual: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    out_features = self.features * self.expansion
    y = self.conv(self.features, (1, 1), padding="VALID", name="conv1")(x)
    y = self.activation(self.norm(name="bn1")(y, use_running_average=not train))
    y = self.conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv2")(y)
    y = self.activation(self.norm(name="bn2")(y, use_running_average=not train))
    y = self.conv(out_features, (1, 1), padding="VALID", name="conv3")(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name="bn3")(y, use_running_average=not train)
    if residual.shape != y.shape:
      residual = self.conv(out_features, (1, 1), self.strides, padding="VALID", name="downsample_conv")(x)
      residual = self.norm(name="downsample_bn")(residual, use_running_average=not train)
    return self.activation(y + residual)


class ResNet(nn.Module):
  """ImageNet ResNet: 7x7/2 stem, 3x3/2 max-pool, four stages, global pool, FC."""
  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_classes: int = 1000
  width: int = 64
  zero_init_residual: bool = False
  conv: ModuleDef = lowering.Conv
  norm: ModuleDef = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
  activation: Callable = nn.relu
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    common.require_input_size(x, 1, type(self).__name__)
    conv = functools.partial(self.conv, use_bias=False, kernel_init=common.torch_conv_init,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
    x = self.activation(norm(name="bn1")(x, use_running_average=not train))
    x = common.max_pool(x, 3, 2, padding=1)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = self.block(self.width * 2**stage, strides, conv=conv, norm=norm,
                       activation=self.activation, zero_init_residual=self.zero_init_residual,
                       name=f"layer{stage + 1}_{index}")(x, train)
    x = common.global_avg_pool(x)
    return nn.Dense(self.num_classes, kernel_init=common.torch_default_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="fc")(x)


_PAPER = "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016."
_DEPTHS = {
    18: ([2, 2, 2, 2], BasicBlock),
    34: ([3, 4, 6, 3], BasicBlock),
    50: ([3, 4, 6, 3], Bottleneck),
    101: ([3, 4, 23, 3], Bottleneck),
    152: ([3, 8, 36, 3], Bottleneck),
}

for _depth, (_stages, _block) in _DEPTHS.items():
  register_model(f"resnet{_depth}", family="resnet", paper=_PAPER,
                 reference=f"torchvision/resnet{_depth}")(
                     functools.partial(ResNet, stage_sizes=tuple(_stages), block=_block))
