"""Plain against residual networks (He et al. 2016, Fig. 1/6): does depth make plain nets worse?

Run:    python -m experiments.run --config experiments/configs/degradation.py
Ray:    python -m experiments.run --config experiments/configs/degradation.py --launcher=ray \
            --config.trial_resources=GPU=1 [--ray_address=auto]
Smoke:  python -m experiments.run --config experiments/configs/degradation.py:smoke

Trains plain-20, plain-56, resnet-20 and resnet-56 (CIFAR layout, option A
shortcuts) with three seeds each on the same data and budget: the procedural
scenes (36 classes of two objects' relation x fine texture, rendered at 64 px
and read at 32 px, where the finest textures alias), hard enough that neither
residual network reaches zero training error. Plots every seed's training
error and loss (training_error.png, training_loss.png), checks each trial's
loss for a plateau, and states, against the seeds' spread, whether the deeper
plain network trains worse and the deeper residual network better.

Why a 5-epoch warmup (390 steps to the rate of 0.1): with 0.5 epochs, resnet-56
(seed 0) collapsed in its first 60 steps, as the rate reached 0.1, to an output
that ignores its input: training loss ln 36 = 3.58 for the next 400 steps, and
its last block's features varied by 0.002 across test images (0.17 after its
first block). He et al. met the same with ResNet-110 and warmed up with a
rate of 0.01 for ~400 iterations; a linear warmup over as many steps let the
same seed reach a loss of 1.09 by step 330. Every network gets the same warmup.
"""

import ml_collections

from cnnjax import train
from experiments.configs import _smoke


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "degradation"
  config.kind = "degradation"
  config.description = "plain-20/56 against resnet-20/56 on scenes at 32 px, 3 seeds"
  # Ray resources of one trial under --launcher=ray ("GPU=1", "CPU=4", "GPU=1,CPU=8").
  config.trial_resources = "CPU=1"
  config.models = ("plain20", "plain56", "resnet20", "resnet56")
  config.seeds = (0, 1, 2)
  config.curve_tail = 5  # logged windows averaged for the final training error
  t = train.default_config()
  t.data.dataset = "scenes/64px"
  t.data.image_size = 32
  # No flips: a mirrored scene swaps "left" and "right", another class.
  t.data.train_crop, t.data.pad, t.data.flip = "pad_crop", 2, False
  t.data.mean, t.data.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
  # 10,000 scenes at 64 px are 0.12 GB decoded: held, no PNG is decoded per step.
  t.data.in_memory = True
  t.model_overrides.widths = (8, 16, 32)
  t.batch_size = 128
  # 30 epochs of 10,000 images; the rate drops 10x at 50% and 75%, so the last 20% of the run
  # shows whether a network's training loss has plateaued (the report checks each trial).
  t.num_epochs = 30.0
  t.optimizer.learning_rate = 0.1
  t.optimizer.schedule = "multistep"
  t.optimizer.boundaries_epochs = (15.0, 22.5)
  t.optimizer.warmup_epochs = 5.0  # see the docstring: resnet-56 collapses with less
  t.optimizer.weight_decay = 1e-4
  t.eval_every_epochs = 5.0
  t.checkpoint_every_epochs = 1.0  # a killed trial loses at most an epoch
  t.log_every_steps = 10
  if variant == "smoke":
    config.models = ("plain20", "resnet20")
    config.seeds = (0, 1)
    config.curve_tail = 1
    _smoke.on_digits(t, image_size=16, batch_size=32, num_steps=4)
    t.model_overrides.widths = (4, 4, 8)
    t.log_every_steps = 2
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of degradation; use full or smoke")
  config.train = t
  return config
