"""DenseNet-121/161/169/201 (Huang et al. 2017), DenseNet-BC as torchvision builds it.

Each dense layer sees the concatenation of every earlier feature map in its
block (BN, ReLU, 1x1 conv to bn_size*k, BN, ReLU, 3x3 conv to k new channels);
transitions halve the channels (compression 0.5) and the resolution
(BN, ReLU, 1x1 conv, 2x2 average pool).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.models import common, lowering
from cnnjax.models.batchnorm import BatchNorm
from cnnjax.registry import register_model

ModuleDef = common.ModuleDef


class DenseLayer(nn.Module):
  growth_rate: int
  bn_size: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.relu(self.norm(name="bn1")(x, use_running_average=not train))
    y = self.conv(self.bn_size * self.growth_rate, (1, 1), padding="VALID", name="conv1")(y)
    y = nn.relu(self.norm(name="bn2")(y, use_running_average=not train))
    y = self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
  features: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(self.norm(name="bn")(x, use_running_average=not train))
    x = self.conv(self.features, (1, 1), padding="VALID", name="conv")(x)
    return common.avg_pool(x, 2, 2)


class DenseNet(nn.Module):
  block_sizes: Sequence[int]
  growth_rate: int = 32
  stem_features: int = 64
  bn_size: int = 4
  compression: float = 0.5
  num_classes: int = 1000
  conv: ModuleDef = lowering.Conv
  norm: ModuleDef = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    # Stem /4, then one 2x2 pool per transition must leave at least 1 pixel.
    common.require_input_size(x, 4 * 2 ** (len(self.block_sizes) - 1) - 3, "DenseNet")
    conv = functools.partial(self.conv, use_bias=False, kernel_init=common.torch_conv_init,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.stem_features, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv0")(x)
    x = nn.relu(norm(name="bn0")(x, use_running_average=not train))
    x = common.max_pool(x, 3, 2, padding=1)
    features = self.stem_features
    for block, num_layers in enumerate(self.block_sizes):
      for index in range(num_layers):
        x = DenseLayer(self.growth_rate, self.bn_size, conv, norm,
                       name=f"block{block + 1}_layer{index + 1}")(x, train)
      features += num_layers * self.growth_rate
      if block != len(self.block_sizes) - 1:
        features = int(features * self.compression)
        x = Transition(features, conv, norm, name=f"transition{block + 1}")(x, train)
    x = nn.relu(norm(name="bn_final")(x, use_running_average=not train))
    x = common.global_avg_pool(x)
    return nn.Dense(self.num_classes, kernel_init=common.torch_default_init,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="classifier")(x)


_PAPER = "Huang, Liu, van der Maaten, Weinberger. Densely Connected Convolutional Networks. CVPR 2017."
_VARIANTS = {
    121: (32, 64, (6, 12, 24, 16)),
    161: (48, 96, (6, 12, 36, 24)),
    169: (32, 64, (6, 12, 32, 32)),
    201: (32, 64, (6, 12, 48, 32)),
}

for _depth, (_growth, _stem, _blocks) in _VARIANTS.items():
  register_model(f"densenet{_depth}", family="densenet", paper=_PAPER, min_input_size=29,
                 reference=f"torchvision/densenet{_depth}")(
                     functools.partial(DenseNet, block_sizes=_blocks, growth_rate=_growth,
                                       stem_features=_stem))
