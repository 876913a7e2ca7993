"""Depthwise-separable against standard convolutions (Howard et al. 2017, Table 4).

Run:    python -m experiments.run --config experiments/configs/depthwise.py
Ray:    python -m experiments.run --config experiments/configs/depthwise.py --launcher=ray \
            --config.trial_resources=GPU=1 [--ray_address=auto]
Smoke:  python -m experiments.run --config experiments/configs/depthwise.py:smoke

Trains MobileNet v1 and the same network with each depthwise-separable block
replaced by one standard 3x3 convolution; reports parameters, FLOPs and
accuracy side by side, and the measured cost ratio of the blocks next to the
theoretical 1/N + 1/k^2.
"""

import ml_collections

from cnnjax import train
from experiments.configs import _smoke


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "depthwise"
  config.kind = "depthwise"
  config.description = "MobileNet v1 (width 0.5) separable against standard convolutions"
  # Ray resources of one trial under --launcher=ray ("GPU=1", "CPU=4", "GPU=1,CPU=8").
  config.trial_resources = "CPU=1"
  t = train.default_config()
  t.model = "mobilenet_v1"
  t.model_overrides.width = 0.5
  t.data.dataset = "gratings/64px"
  t.data.image_size = 64
  t.data.train_crop, t.data.pad, t.data.flip = "pad_crop", 4, True
  t.data.mean, t.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  t.batch_size = 64
  t.num_epochs = 6.0
  t.optimizer.name = "sgd"
  t.optimizer.learning_rate = 0.05
  t.optimizer.warmup_epochs = 0.5
  t.optimizer.weight_decay = 4e-5
  t.eval_every_epochs = 2.0
  if variant == "smoke":
    t.model_overrides.width = 0.25
    _smoke.on_digits(t, image_size=32, batch_size=32, num_steps=3)
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of depthwise; use full or smoke")
  config.train = t
  return config
