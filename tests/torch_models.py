"""The PyTorch side of the weight-parity checks: reference models and their logits.

Needs torch, torchvision and timm (`make test-torch`), so only
`tests/reference/weights/make_weights.py` and `tests/test_weights_torch.py`
import it. `FULL` names every cnnjax model with a reference and how the
reference library builds it; `NARROW` builds reduced-width twins with the
references' own classes and forward code (small enough to commit their
weights) and the cnnjax overrides that give the same network.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import timm
import torch
import torchvision
from timm.models import efficientnet as timm_efficientnet
from torch import nn

# torchvision.models re-exports functions under some of its modules' names.
tv_googlenet = importlib.import_module("torchvision.models.googlenet")
tv_resnet = importlib.import_module("torchvision.models.resnet")
tv_vgg = importlib.import_module("torchvision.models.vgg")

tv = torchvision.models

FULL = {
    "alexnet": tv.alexnet,
    **{f"vgg{d}{bn}": getattr(tv, f"vgg{d}{bn}") for d in (11, 13, 16, 19) for bn in ("", "_bn")},
    # torchvision's checkpoint carries the auxiliary heads; cnnjax's default model drops them.
    "googlenet": functools.partial(tv.googlenet, aux_logits=True, init_weights=True),
    **{f"resnet{d}": getattr(tv, f"resnet{d}") for d in (18, 34, 50, 101, 152)},
    **{f"densenet{d}": getattr(tv, f"densenet{d}") for d in (121, 161, 169, 201)},
    "mobilenet_v2": tv.mobilenet_v2,
    "mobilenet_v1": functools.partial(timm.create_model, "mobilenetv1_100"),
    **{f"efficientnet_b{i}": functools.partial(timm.create_model, f"tf_efficientnet_b{i}")
       for i in range(8)},
}

NUM_CLASSES = 10


def _narrow_alexnet():
  model = tv.AlexNet(num_classes=NUM_CLASSES)
  # torchvision's module indices (conv 0, 3, 6, 8, 10; classifier 1, 4, 6), narrower.
  model.features = nn.Sequential(
      nn.Conv2d(3, 16, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
      nn.Conv2d(16, 24, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
      nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 24, 3, padding=1), nn.ReLU(),
      nn.Conv2d(24, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
  model.classifier = nn.Sequential(
      nn.Dropout(), nn.Linear(16 * 36, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 32), nn.ReLU(),
      nn.Linear(32, NUM_CLASSES))
  return model


_ALEXNET_LAYERS = ((16, 11, 4, 2, 1, False, True), (24, 5, 1, 2, 1, False, True),
                   (32, 3, 1, 1, 1, False, False), (24, 3, 1, 1, 1, False, False),
                   (16, 3, 1, 1, 1, False, True))
_VGG_LAYERS = (8, "M", 16, "M", 16, 16, "M", 24, 24, "M", 24, 24, "M")


def _narrow_vgg(batch_norm: bool):
  model = tv_vgg.VGG(tv_vgg.make_layers(list(_VGG_LAYERS), batch_norm=batch_norm),
                     num_classes=NUM_CLASSES)
  model.classifier = nn.Sequential(
      nn.Linear(24 * 49, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 32), nn.ReLU(True),
      nn.Dropout(), nn.Linear(32, NUM_CLASSES))
  return model


def _narrow_resnet(block, layers, width: int):
  model = tv_resnet.ResNet(block, layers, num_classes=NUM_CLASSES)
  # Rebuilt with torchvision's own _make_layer, from a narrower stem.
  model.inplanes = width
  model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
  model.bn1 = nn.BatchNorm2d(width)
  for stage, count in enumerate(layers):
    setattr(model, f"layer{stage + 1}",
            model._make_layer(block, width * 2**stage, count, stride=1 if stage == 0 else 2))
  model.fc = nn.Linear(width * 8 * block.expansion, NUM_CLASSES)
  return model


_GOOGLENET_STEM = (8, 8, 16)
_GOOGLENET_INCEPTION = ((8, 4, 8, 2, 4, 4), (8, 8, 8, 2, 4, 4), (8, 4, 8, 2, 4, 4),
                        (8, 4, 8, 2, 4, 4), (8, 4, 8, 2, 4, 4), (8, 4, 8, 2, 4, 4),
                        (8, 8, 8, 4, 8, 8), (8, 8, 8, 4, 8, 8), (8, 8, 8, 4, 8, 8))


def _narrow_googlenet():
  model = tv.GoogLeNet(num_classes=NUM_CLASSES, aux_logits=False, init_weights=True)
  basic, inception = tv_googlenet.BasicConv2d, tv_googlenet.Inception
  s1, s2, s3 = _GOOGLENET_STEM
  model.conv1 = basic(3, s1, kernel_size=7, stride=2, padding=3)
  model.conv2 = basic(s1, s2, kernel_size=1)
  model.conv3 = basic(s2, s3, kernel_size=3, padding=1)
  channels = s3
  names = ("3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b")
  for name, widths in zip(names, _GOOGLENET_INCEPTION):
    setattr(model, f"inception{name}", inception(channels, *widths))
    channels = widths[0] + widths[2] + widths[4] + widths[5]
  model.fc = nn.Linear(channels, NUM_CLASSES)
  return model


# key -> (cnnjax model, cnnjax overrides, torch builder, image size)
NARROW = {
    "alexnet": ("alexnet", {"layers": _ALEXNET_LAYERS, "hidden": 32}, _narrow_alexnet, 64),
    "vgg11": ("vgg11", {"layers": _VGG_LAYERS, "hidden": 32},
              functools.partial(_narrow_vgg, False), 32),
    "vgg11_bn": ("vgg11_bn", {"layers": _VGG_LAYERS, "hidden": 32},
                 functools.partial(_narrow_vgg, True), 32),
    "googlenet": ("googlenet", {"stem_widths": _GOOGLENET_STEM,
                                "inception_widths": _GOOGLENET_INCEPTION},
                  _narrow_googlenet, 40),
    "resnet18": ("resnet18", {"width": 4},
                 functools.partial(_narrow_resnet, tv_resnet.BasicBlock, [2, 2, 2, 2], 4), 32),
    "resnet50": ("resnet50", {"width": 4, "stage_sizes": (1, 2, 1, 1)},
                 functools.partial(_narrow_resnet, tv_resnet.Bottleneck, [1, 2, 1, 1], 4), 32),
    "densenet121": ("densenet121", {"block_sizes": (2, 3, 2, 2), "growth_rate": 4,
                                    "stem_features": 8, "bn_size": 2},
                    functools.partial(tv.DenseNet, growth_rate=4, block_config=(2, 3, 2, 2),
                                      num_init_features=8, bn_size=2, num_classes=NUM_CLASSES),
                    32),
    "mobilenet_v2": ("mobilenet_v2_025", {},
                     functools.partial(tv.mobilenet_v2, width_mult=0.25, num_classes=NUM_CLASSES),
                     32),
    "mobilenet_v1": ("mobilenet_v1_025", {},
                     functools.partial(timm_efficientnet._gen_mobilenet_v1, "mobilenetv1_100", 0.25,
                                       num_classes=NUM_CLASSES), 32),
    "efficientnet": ("efficientnet", {"width": 0.25, "depth": 0.5},
                     functools.partial(timm_efficientnet._gen_efficientnet, "tf_efficientnet_b0",
                                       channel_multiplier=0.25, depth_multiplier=0.5,
                                       bn_eps=1e-3, pad_type="same", num_classes=NUM_CLASSES),
                     33),
}


def randomise_batch_norm(model: nn.Module, image_size: int, seed: int,
                         jitter: float = 0.05) -> nn.Module:
  """Random affine parameters, then the statistics of random images, then every statistic jittered.

  Every BatchNorm entry ends up random and unlike its default, so one that a
  loader left unmapped shows in the logits. The statistics are measured, not
  drawn, because eval-mode statistics far from the activations' own compound
  over fifty layers into logits of 1e4 whose float32 rounding differs between
  any two implementations; `jitter` keeps that growth small.
  """
  generator = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
  with torch.no_grad():
    for norm in norms:
      shape = norm.running_mean.shape
      norm.weight.copy_(torch.empty(shape).uniform_(0.6, 1.5, generator=generator))
      norm.bias.copy_(0.1 * torch.randn(shape, generator=generator))
      norm.reset_running_stats()
      norm.momentum = None  # a cumulative average over the calibration batches
    model.train()
    for _ in range(2):
      model(torch.randn(8, 3, image_size, image_size, generator=generator))
    for norm in norms:
      shape = norm.running_mean.shape
      norm.running_mean.add_(jitter * torch.randn(shape, generator=generator)
                             * norm.running_var.sqrt())
      norm.running_var.mul_(torch.empty(shape).uniform_(1 - jitter, 1 + jitter,
                                                        generator=generator))
      norm.momentum = 0.1
  return model.eval()


def images(count: int, size: int, seed: int) -> np.ndarray:
  """NHWC float32 images, the same on every machine (numpy's PCG64 with a fixed seed)."""
  return np.random.default_rng(seed).standard_normal((count, size, size, 3), np.float32)


def logits(model: nn.Module, batch_nhwc: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.from_numpy(np.ascontiguousarray(batch_nhwc.transpose(0, 3, 1, 2)))).numpy()
