"""MobileNet v1 (Howard et al. 2017) and v2 (Sandler et al. 2018) as stage data.

v1 is thirteen depthwise-separable blocks: a kxk depthwise filter per channel
then a 1x1 pointwise mix, costing 1/N + 1/k^2 of a standard convolution.
v2 stacks inverted residuals: expand with 1x1, filter depthwise, project back
linearly (no activation on the bottleneck), identity shortcut where shapes
match. Both take a width multiplier; layouts, counts and activations follow
timm's `mobilenetv1_100` and torchvision's `mobilenet_v2`: ReLU6 in both (the
v1 paper says ReLU; the reference code and its weights use ReLU6).
"""

from __future__ import annotations

import functools

from flax import linen as nn

from cnnjax.models import common
from cnnjax.models.batchnorm import BatchNorm
from cnnjax.models.mobile import MobileConvNet
from cnnjax.registry import register_model

MOBILENET_V1_STAGES = (
    "ds_r1_k3_s1_o64", "ds_r1_k3_s2_o128", "ds_r1_k3_s1_o128", "ds_r1_k3_s2_o256",
    "ds_r1_k3_s1_o256", "ds_r1_k3_s2_o512", "ds_r5_k3_s1_o512", "ds_r1_k3_s2_o1024",
    "ds_r1_k3_s1_o1024",
)
MOBILENET_V2_STAGES = (
    "mb_r1_k3_s1_e1_o16", "mb_r2_k3_s2_e6_o24", "mb_r3_k3_s2_e6_o32", "mb_r4_k3_s2_e6_o64",
    "mb_r3_k3_s1_e6_o96", "mb_r3_k3_s2_e6_o160", "mb_r1_k3_s1_e6_o320",
)

_torch_norm = functools.partial(BatchNorm, momentum=0.9, epsilon=1e-5)

MobileNetV1 = functools.partial(
    MobileConvNet, stages=MOBILENET_V1_STAGES, head_features=None, dropout=0.0,
    padding="symmetric", activation=nn.relu6, norm=_torch_norm, resolution=224)

MobileNetV2 = functools.partial(
    MobileConvNet, stages=MOBILENET_V2_STAGES, head_features=1280, head_min_width=1.0,
    dropout=0.2, padding="symmetric", activation=nn.relu6, norm=_torch_norm,
    kernel_init=common.torch_conv_init, dense_init=nn.initializers.normal(0.01), resolution=224)

_V1_PAPER = ("Howard et al. MobileNets: Efficient Convolutional Neural Networks for Mobile "
             "Vision Applications. arXiv:1704.04861, 2017.")
_V2_PAPER = ("Sandler et al. MobileNetV2: Inverted Residuals and Linear Bottlenecks. "
             "CVPR 2018.")

for _width, _suffix in ((1.0, ""), (0.75, "_075"), (0.5, "_050"), (0.25, "_025")):
  register_model(f"mobilenet_v1{_suffix}", family="mobilenet_v1", paper=_V1_PAPER,
                 reference="timm/mobilenetv1_100" if _width == 1.0 else None)(
                     functools.partial(MobileNetV1, width=_width))
  register_model(f"mobilenet_v2{_suffix}", family="mobilenet_v2", paper=_V2_PAPER,
                 reference="torchvision/mobilenet_v2" if _width == 1.0 else None)(
                     functools.partial(MobileNetV2, width=_width))
