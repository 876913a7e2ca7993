"""EfficientNet-B0 ... B7 (Tan & Le 2019) and EfficientNet at any coefficients.

B0's stages are the original code's block strings; a variant is B0 with a
width and a depth multiplier (channels by `round_filters`, repeats by
`round_repeats`), its own resolution and dropout. Faithful to the TensorFlow
original: TF 'SAME' padding, swish, squeeze-excite sized from the block input,
stochastic depth rising linearly to 0.2, BatchNorm momentum 0.99 and epsilon
1e-3, and the original initialisers. `create_model('efficientnet', width=...,
depth=..., dropout=...)` builds any point of the compound-scaling space; its
default resolution follows from the coefficients
(`cnnjax.models.blockspec.default_resolution`).
"""

from __future__ import annotations

import functools

from cnnjax.models.mobile import MobileConvNet
from cnnjax.registry import register_model

EFFICIENTNET_B0_STAGES = (
    "mb_r1_k3_s11_e1_i32_o16_se0.25", "mb_r2_k3_s22_e6_i16_o24_se0.25",
    "mb_r2_k5_s22_e6_i24_o40_se0.25", "mb_r3_k3_s22_e6_i40_o80_se0.25",
    "mb_r3_k5_s11_e6_i80_o112_se0.25", "mb_r4_k5_s22_e6_i112_o192_se0.25",
    "mb_r1_k3_s11_e6_i192_o320_se0.25",
)

# variant: (width, depth, resolution, dropout, timm crop fraction)
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2, 0.875),
    "b1": (1.0, 1.1, 240, 0.2, 0.882),
    "b2": (1.1, 1.2, 260, 0.3, 0.890),
    "b3": (1.2, 1.4, 300, 0.3, 0.904),
    "b4": (1.4, 1.8, 380, 0.4, 0.922),
    "b5": (1.6, 2.2, 456, 0.4, 0.934),
    "b6": (1.8, 2.6, 528, 0.5, 0.942),
    "b7": (2.0, 3.1, 600, 0.5, 0.949),
}

EfficientNet = functools.partial(MobileConvNet, stages=EFFICIENTNET_B0_STAGES, stem_features=32,
                                 head_features=1280, drop_path=0.2)

_PAPER = ("Tan, Le. EfficientNet: Rethinking Model Scaling for Convolutional Neural "
          "Networks. ICML 2019.")

for _name, (_width, _depth, _resolution, _dropout, _crop) in VARIANTS.items():
  register_model(f"efficientnet_{_name}", family="efficientnet", paper=_PAPER,
                 input_size=_resolution, crop_fraction=_crop, interpolation="bicubic",
                 reference=f"timm/tf_efficientnet_{_name}")(
                     functools.partial(EfficientNet, width=_width, depth=_depth,
                                       dropout=_dropout, resolution=_resolution))

register_model("efficientnet", family="efficientnet", paper=_PAPER, interpolation="bicubic")(
    EfficientNet)
