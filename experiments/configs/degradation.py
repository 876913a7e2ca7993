"""Plain against residual networks (He et al. 2016, Fig. 1/6): does depth make plain nets worse?

Run:    python -m experiments.run --config experiments/configs/degradation.py
Ray:    python -m experiments.run --config experiments/configs/degradation.py --launcher=ray \
            --config.trial_resources=GPU=1 [--ray_address=auto]
Smoke:  python -m experiments.run --config experiments/configs/degradation.py:smoke

Trains plain-20, plain-56, resnet-20 and resnet-56 (CIFAR layout, option A
shortcuts) on the same data with the same budget, plots the training-error
curves together (training_error.png) and states whether the deeper plain
network trains worse and the deeper residual network better.
"""

import ml_collections

from cnnjax import train
from experiments.configs import _smoke


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "degradation"
  config.kind = "degradation"
  config.description = "plain-20/56 against resnet-20/56 on 32px gratings"
  # Ray resources of one trial under --launcher=ray ("GPU=1", "CPU=4", "GPU=1,CPU=8").
  config.trial_resources = "CPU=1"
  config.models = ("plain20", "plain56", "resnet20", "resnet56")
  config.curve_tail = 3  # logged windows averaged for the final training error
  # Final training errors closer than this are a tie (a logged window holds 1,280 images).
  config.tie_tolerance = 0.01
  t = train.default_config()
  t.data.dataset = "gratings/32px"
  t.data.image_size = 32
  t.data.train_crop, t.data.pad, t.data.flip = "pad_crop", 2, True
  t.data.mean, t.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  t.model_overrides.widths = (8, 16, 32)
  t.batch_size = 128
  t.num_epochs = 6.0
  t.optimizer.learning_rate = 0.1
  t.optimizer.schedule = "multistep"
  t.optimizer.boundaries_epochs = (4.0, 5.0)
  t.optimizer.warmup_epochs = 0.5
  t.optimizer.weight_decay = 1e-4
  t.eval_every_epochs = 2.0
  t.log_every_steps = 10
  if variant == "smoke":
    config.models = ("plain20", "resnet20")
    config.curve_tail = 1
    _smoke.on_digits(t, image_size=16, batch_size=32, num_steps=4)
    t.model_overrides.widths = (4, 4, 8)
    t.log_every_steps = 2
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of degradation; use full or smoke")
  config.train = t
  return config
