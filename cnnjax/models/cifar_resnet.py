"""The CIFAR-10 ResNets of He et al. (2016, section 4.2) and their plain twins.

6n+2 layers: a 3x3 stem with 16 channels, three stages of n basic blocks with
16/32/64 channels on 32/16/8 maps, global pooling and a 10-way classifier.
Shortcuts are option A: identity, or stride-2 subsampling with zero-padded
extra channels, so they add no parameters and the plain networks (the same
layers without shortcuts) have exactly the same parameter count.
`zero_init_residual` starts each block's last BatchNorm scale at 0: a ResNet-56
then starts as its stem, shortcuts and classifier, the function a ResNet-20 so
initialised computes too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax import registry
from cnnjax.models import common, lowering
from cnnjax.models.batchnorm import BatchNorm

ModuleDef = common.ModuleDef


def zero_pad_shortcut(x: jax.Array, features: int, strides: int) -> jax.Array:
  """Option A shortcut: subsample spatially, zero-pad the new channels."""
  if strides > 1:
    x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra > 0:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class CifarBlock(nn.Module):
  features: int
  strides: int
  residual: bool
  conv: ModuleDef
  norm: ModuleDef
  activation: Callable
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    y = self.conv(self.features, (3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
    y = self.activation(self.norm(name="bn1")(y, use_running_average=not train))
    y = self.conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    last_scale = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = self.norm(scale_init=last_scale, name="bn2")(y, use_running_average=not train)
    if self.residual:
      y = y + zero_pad_shortcut(x, self.features, self.strides)
    return self.activation(y)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 images; `residual=False` gives the plain network."""
  depth: int
  residual: bool = True
  num_classes: int = 10
  widths: tuple[int, int, int] = (16, 32, 64)
  zero_init_residual: bool = False
  conv: ModuleDef = lowering.Conv
  norm: ModuleDef = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
  activation: Callable = nn.relu
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if (self.depth - 2) % 6 != 0 or self.depth < 8:
      raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...), "
                       f"got {self.depth}")
    if self.zero_init_residual and not self.residual:
      raise ValueError("zero_init_residual zeroes the last BatchNorm of each residual branch; a "
                       "plain network has no shortcut, so it would start with every block dead. "
                       "Use it with the resnet* networks, or leave it False")
    common.require_input_size(x, 1, type(self).__name__)
    blocks_per_stage = (self.depth - 2) // 6
    conv = functools.partial(self.conv, use_bias=False, kernel_init=common.torch_conv_init,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)
    x = self.activation(norm(name="bn1")(x, use_running_average=not train))
    for stage, features in enumerate(self.widths):
      for index in range(blocks_per_stage):
        strides = 2 if stage > 0 and index == 0 else 1
        x = CifarBlock(features, strides, self.residual, conv=conv, norm=norm,
                       activation=self.activation, zero_init_residual=self.zero_init_residual,
                       name=f"stage{stage + 1}_{index}")(x, train)
    x = common.global_avg_pool(x)
    return nn.Dense(self.num_classes, kernel_init=common.torch_default_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="fc")(x)


_PAPER = ("He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition. CVPR 2016, "
          "section 4.2 (CIFAR-10).")

for _depth in (20, 32, 44, 56, 110):
  for _residual, _prefix in ((True, "resnet"), (False, "plain")):
    registry.register_model(
        f"{_prefix}{_depth}", family="cifar_resnet" if _residual else "cifar_plain",
        paper=_PAPER, input_size=32, num_classes=10, crop_fraction=1.0,
        mean=registry.CIFAR10_MEAN, std=registry.CIFAR10_STD,
        reference=f"cifar/resnet{_depth}")(
            functools.partial(CifarResNet, depth=_depth, residual=_residual))
