"""A ResNet-20 trained on the embedded MNIST-5k digits: a few minutes on 2 CPU cores.

Run:    python -m experiments.run            (the default experiment)
        python -m experiments.run --config experiments/configs/quickstart.py
Smoke:  python -m experiments.run --config experiments/configs/quickstart.py:smoke

Shows the whole path working end to end: the embedded dataset prepared on first
use, a sharded jit training step, evaluation over every test image, checkpoints
and metrics in runs/quickstart/. Expect about 97% test accuracy.
"""

import ml_collections

from cnnjax import train
from experiments.configs import _smoke


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "quickstart"
  config.kind = "train"
  config.description = "ResNet-20 (widths 8-16-32) on MNIST-5k, 28x28"
  t = train.default_config()
  t.model = "resnet20"
  t.model_overrides.widths = (8, 16, 32)
  t.data.dataset = "mnist5k"
  t.data.image_size = 28
  t.data.train_crop, t.data.pad, t.data.flip = "pad_crop", 2, False
  t.data.mean, t.data.std = (0.13,), (0.31,)
  t.batch_size = 64
  t.num_epochs = 4.0
  t.optimizer.learning_rate = 0.1
  t.optimizer.warmup_epochs = 0.25
  t.optimizer.weight_decay = 5e-4
  t.best_metric = "top1"
  if variant == "smoke":
    _smoke.on_digits(t, image_size=16, batch_size=32, num_steps=6)
    t.model_overrides.widths = (4, 4, 8)
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of quickstart; use full or smoke")
  config.train = t
  return config
