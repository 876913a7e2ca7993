"""One short training of every family on the same data and resolution: cost and accuracy.

Run:    python -m experiments.run --config experiments/configs/zoo.py
Ray:    python -m experiments.run --config experiments/configs/zoo.py --launcher=ray \
            --config.trial_resources=GPU=1 [--ray_address=auto]
Smoke:  python -m experiments.run --config experiments/configs/zoo.py:smoke

AlexNet, VGG-11-BN, GoogLeNet, ResNet-18, DenseNet-121, MobileNet v2 and
EfficientNet-B0 at 64x64 (AlexNet's minimum is 63) on the 64px gratings:
parameters, FLOPs, accuracy and training images/s in one table. A short
budget ranks how fast each family learns here, not how good it is.
"""

import ml_collections

from cnnjax import train
from experiments.configs import _smoke

FAMILIES = ("alexnet", "vgg11_bn", "googlenet", "resnet18", "densenet121", "mobilenet_v2",
            "efficientnet_b0")


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "zoo"
  config.kind = "zoo"
  config.description = "every family, 64x64 gratings, a short equal budget"
  # Ray resources of one trial under --launcher=ray ("GPU=1", "CPU=4", "GPU=1,CPU=8").
  config.trial_resources = "CPU=1"
  t = train.default_config()
  t.data.dataset = "gratings/64px"
  t.data.image_size = 64
  t.data.train_crop, t.data.pad, t.data.flip = "pad_crop", 4, True
  t.data.mean, t.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  t.batch_size = 32
  t.num_steps = 300
  t.optimizer.name = "adamw"
  t.optimizer.learning_rate = 1e-3
  t.optimizer.weight_decay = 0.05
  t.optimizer.weight_decay_mode = "decoupled"
  t.optimizer.warmup_epochs = 0.2
  t.eval_every_epochs = 100.0  # evaluate at the end only
  trials = [{"name": model, "overrides": {"model": model}} for model in FAMILIES]
  if variant == "smoke":
    small = {
        "densenet121": {"block_sizes": (1, 1, 1, 1), "growth_rate": 4, "stem_features": 8},
        "mobilenet_v2": {"width": 0.25, "depth": 0.1},
        "efficientnet_b0": {"width": 0.25, "depth": 0.1},
    }
    trials = [{"name": m, "overrides": {"model": m, **{f"model_overrides.{k}": v
                                                        for k, v in small[m].items()}}}
              for m in small]
    _smoke.on_digits(t, image_size=32, batch_size=16, num_steps=2)
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of zoo; use full or smoke")
  config.trials = trials
  config.train = t
  return config
