"""VGG-11/13/16/19 (Simonyan & Zisserman 2015), with and without BatchNorm.

Configurations A, B, D and E of the paper as data: stacks of 3x3 convolutions
(two 3x3 layers see what one 5x5 sees, with 18 instead of 25 weights per
channel pair), 2x2 max-pooling, and torchvision's classifier after a 7x7
adaptive average pool.
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

# Integers are 3x3 convolutions with that many filters, "M" a 2x2/2 max-pool.
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}


class VGG(nn.Module):
  layers: Sequence[int | str]
  batch_norm: bool = False
  num_classes: int = 1000
  hidden: int = 4096
  dropout: float = 0.5
  conv: ModuleDef = lowering.Conv
  norm: ModuleDef = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    common.require_input_size(x, 2 ** self.layers.count("M"), "VGG")
    conv_index = 0
    for layer in self.layers:
      if layer == "M":
        x = common.max_pool(x, 2, 2)
        continue
      conv_index += 1
      x = self.conv(layer, (3, 3), padding=((1, 1), (1, 1)), kernel_init=common.torch_conv_init,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{conv_index}")(x)
      if self.batch_norm:
        x = self.norm(dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f"bn{conv_index}")(x, use_running_average=not train)
      x = nn.relu(x)
    x = common.adaptive_avg_pool(x, 7)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    # torchvision initialises VGG's linear layers with N(0, 0.01).
    dense = functools.partial(nn.Dense, kernel_init=nn.initializers.normal(0.01),
                              dtype=self.dtype, param_dtype=self.param_dtype)
    for index in range(2):
      x = nn.relu(dense(self.hidden, name=f"fc{index + 1}")(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(self.num_classes, name="fc3")(x)


_PAPER = ("Simonyan, Zisserman. Very Deep Convolutional Networks for Large-Scale Image "
          "Recognition. ICLR 2015.")

for _depth, _layers in CONFIGS.items():
  for _bn in (False, True):
    _name = f"vgg{_depth}" + ("_bn" if _bn else "")
    register_model(_name, family="vgg", paper=_PAPER, min_input_size=32,
                   # torchvision's reference file has no vgg11_bn / vgg13_bn entry.
                   reference=None if _bn and _depth < 16 else f"torchvision/{_name}")(
                       functools.partial(VGG, layers=_layers, batch_norm=_bn))
