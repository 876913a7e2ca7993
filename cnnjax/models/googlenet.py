"""GoogLeNet / Inception v1 (Szegedy et al. 2015) in torchvision's layout.

Inception modules run four branches in parallel and concatenate them: 1x1;
1x1 reduction then 3x3; 1x1 reduction then the "5x5" branch; 3x3 max-pool then
1x1 projection. The 1x1 reductions are what make the module affordable: they
shrink the channels before the expensive spatial convolutions.

Two deliberate torchvision conventions keep the parameter counts equal to the
reference: every convolution is conv (no bias) + BatchNorm (eps 1e-3), and the
"5x5" branch uses a 3x3 kernel (a long-standing torchvision quirk kept for
weight compatibility; `five_by_five=5` gives the paper's kernel). Max-pools use
ceil mode. The two auxiliary classifiers exist when `aux_logits=True` and their
logits are returned in training only, as `(logits, aux1, aux2)`.
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

# torchvision's GoogLeNet initialiser: truncated normal, std 0.01, within +-2.
_trunc_normal = nn.initializers.truncated_normal(0.01, lower=-2.0, upper=2.0)


class ConvBN(nn.Module):
  features: int
  kernel: int
  strides: int = 1
  conv: ModuleDef = lowering.Conv
  norm: ModuleDef = BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    pad = (self.kernel - 1) // 2
    x = self.conv(self.features, (self.kernel, self.kernel), self.strides,
                  padding=((pad, pad), (pad, pad)), use_bias=False, name="conv")(x)
    return nn.relu(self.norm(name="bn")(x, use_running_average=not train))


class Inception(nn.Module):
  # (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection)
  widths: Sequence[int]
  five_by_five: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool):
    c1, c3r, c3, c5r, c5, cp = self.widths
    block = functools.partial(ConvBN, conv=self.conv, norm=self.norm)
    branch1 = block(c1, 1, name="branch1")(x, train)
    branch2 = block(c3r, 1, name="branch2_reduce")(x, train)
    branch2 = block(c3, 3, name="branch2")(branch2, train)
    branch3 = block(c5r, 1, name="branch3_reduce")(x, train)
    branch3 = block(c5, self.five_by_five, name="branch3")(branch3, train)
    branch4 = common.max_pool(x, 3, 1, padding=1, ceil_mode=True)
    branch4 = block(cp, 1, name="branch4")(branch4, train)
    return jnp.concatenate([branch1, branch2, branch3, branch4], axis=-1)


class AuxHead(nn.Module):
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef
  dense: ModuleDef
  dropout: float = 0.7

  @nn.compact
  def __call__(self, x, train: bool):
    x = common.adaptive_avg_pool(x, 4)
    x = ConvBN(128, 1, conv=self.conv, norm=self.norm, name="conv")(x, train)
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    x = nn.relu(self.dense(1024, name="fc1")(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return self.dense(self.num_classes, name="fc2")(x)


# The inception modules in order, each (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection).
INCEPTION_NAMES = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")
INCEPTION_WIDTHS = (
    (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64),
    (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64),
    (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
    (256, 160, 320, 32, 128, 128),
    (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128),
)


# Smallest input whose ceil-mode pools leave no empty map (tests/test_input_size.py).
MIN_INPUT_SIZE = 15


class GoogLeNet(nn.Module):
  num_classes: int = 1000
  # The stem's three convolutions and the inception modules' widths (narrow twins for tests).
  stem_widths: Sequence[int] = (64, 64, 192)
  inception_widths: Sequence[Sequence[int]] = INCEPTION_WIDTHS
  aux_logits: bool = False
  five_by_five: int = 3
  dropout: float = 0.2
  aux_dropout: float = 0.7
  conv: ModuleDef = lowering.Conv
  norm: ModuleDef = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-3)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False):
    common.require_input_size(x, MIN_INPUT_SIZE, "GoogLeNet")
    conv = functools.partial(self.conv, kernel_init=_trunc_normal, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(self.norm, dtype=self.dtype, param_dtype=self.param_dtype)
    dense = functools.partial(nn.Dense, kernel_init=_trunc_normal, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    inception = functools.partial(Inception, five_by_five=self.five_by_five, conv=conv, norm=norm)
    block = functools.partial(ConvBN, conv=conv, norm=norm)

    widths = dict(zip(INCEPTION_NAMES, self.inception_widths, strict=True))
    stem1, stem2, stem3 = self.stem_widths
    x = block(stem1, 7, 2, name="conv1")(x, train)
    x = common.max_pool(x, 3, 2, ceil_mode=True)
    x = block(stem2, 1, name="conv2")(x, train)
    x = block(stem3, 3, name="conv3")(x, train)
    x = common.max_pool(x, 3, 2, ceil_mode=True)
    x = inception(widths["3a"], name="inception3a")(x, train)
    x = inception(widths["3b"], name="inception3b")(x, train)
    x = common.max_pool(x, 3, 2, ceil_mode=True)
    aux = []
    for name in ("4a", "4b", "4c", "4d", "4e"):
      x = inception(widths[name], name=f"inception{name}")(x, train)
      # The heads run in training only, and at init so that their parameters exist.
      if self.aux_logits and name in ("4a", "4d") and (train or self.is_initializing()):
        head = AuxHead(self.num_classes, conv, norm, dense, self.aux_dropout,
                       name=f"aux{len(aux) + 1}")
        aux.append(head(x, train))
    x = common.max_pool(x, 2, 2, ceil_mode=True)
    x = inception(widths["5a"], name="inception5a")(x, train)
    x = inception(widths["5b"], name="inception5b")(x, train)
    x = common.global_avg_pool(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    logits = dense(self.num_classes, name="fc")(x)
    if self.aux_logits and train:
      return (logits, *aux)
    return logits


_PAPER = "Szegedy et al. Going Deeper with Convolutions. CVPR 2015."

register_model("googlenet", family="googlenet", paper=_PAPER, min_input_size=MIN_INPUT_SIZE,
               reference="torchvision/googlenet_auxFalse")(functools.partial(GoogLeNet))
