"""AlexNet: torchvision's single-tower layout and the 2012 paper's network.

`alexnet` follows torchvision (64/192/384/256/256 filters, no LRN).
`alexnet_paper` is Krizhevsky, Sutskever and Hinton (2012): 96 filters of
11x11 with stride 4 on 227x227 inputs, local response normalization after the
first two convolutions, overlapping 3x3/2 max-pooling, the two-GPU split
expressed as grouped convolutions (layers 2, 4 and 5 only see the kernels of
their own GPU), ReLU everywhere and dropout 0.5 in the classifier.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cnnjax.models import common, lowering
from cnnjax.registry import register_model

ModuleDef = common.ModuleDef


# (features, kernel, stride, padding, groups, lrn_after, pool_after)
_TORCHVISION = (
    (64, 11, 4, 2, 1, False, True),
    (192, 5, 1, 2, 1, False, True),
    (384, 3, 1, 1, 1, False, False),
    (256, 3, 1, 1, 1, False, False),
    (256, 3, 1, 1, 1, False, True),
)
_PAPER_LAYERS = (
    (96, 11, 4, 0, 1, True, True),
    (256, 5, 1, 2, 2, True, True),
    (384, 3, 1, 1, 1, False, False),
    (384, 3, 1, 1, 2, False, False),
    (256, 3, 1, 1, 2, False, True),
)


def smallest_input(layers) -> int:
  """Smallest square input for which no feature map of `layers` is empty."""

  def final_size(size: int) -> int:
    for _, kernel, stride, pad, _, _, pool in layers:
      size = (size + 2 * pad - kernel) // stride + 1
      if pool and size > 0:
        size = (size - 3) // 2 + 1
      if size < 1:
        return 0
    return size

  size = 1
  while final_size(size) < 1:
    size += 1
  return size


class AlexNet(nn.Module):
  """Five convolutions, three overlapping max-pools, three dense layers."""
  layers: Sequence[tuple[int, int, int, int, int, bool, bool]] = _TORCHVISION
  num_classes: int = 1000
  hidden: int = 4096
  dropout: float = 0.5
  conv: ModuleDef = lowering.Conv
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    common.require_input_size(x, smallest_input(self.layers), "AlexNet")
    for index, (features, kernel, stride, pad, groups, lrn, pool) in enumerate(self.layers):
      x = self.conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                    feature_group_count=groups, kernel_init=common.torch_default_init,
                    dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{index + 1}")(x)
      x = nn.relu(x)
      if lrn:
        x = common.LocalResponseNorm(name=f"lrn{index + 1}")(x)
      if pool:
        x = common.max_pool(x, 3, 2)
    # torchvision's AdaptiveAvgPool2d((6, 6)): the identity at the native size.
    x = common.adaptive_avg_pool(x, 6)
    # Flatten channel-major, as the reference implementation orders its weights.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    dense = functools.partial(nn.Dense, kernel_init=common.torch_default_init, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    for index in range(2):
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
      x = nn.relu(dense(self.hidden, name=f"fc{index + 1}")(x))
    return dense(self.num_classes, name="fc3")(x)


_TV_PAPER = ("Krizhevsky. One weird trick for parallelizing convolutional neural networks. "
             "arXiv:1404.5997, 2014 (torchvision's AlexNet).")
_PAPER = ("Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep Convolutional "
          "Neural Networks. NeurIPS 2012.")

register_model("alexnet", family="alexnet", paper=_TV_PAPER, min_input_size=63,
               reference="torchvision/alexnet")(functools.partial(AlexNet))
register_model("alexnet_paper", family="alexnet", paper=_PAPER, input_size=227,
               min_input_size=67, crop_fraction=227 / 256)(
                   functools.partial(AlexNet, layers=_PAPER_LAYERS))
