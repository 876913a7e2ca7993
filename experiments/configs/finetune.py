"""Fine-tuning pretrained weights against training from scratch, on the same small budget.

Run:    python -m experiments.run --config experiments/configs/finetune.py
Own weights (a torchvision/timm checkpoint, any class count) on an image folder:
        python -m experiments.run --config experiments/configs/finetune.py \
            --config.init_from=~/resnet18-f37072fd.pth \
            --config.train.model_overrides.width=64 \
            --config.train.data.dataset=folder:/data/flowers --config.train.data.image_size=128
Smoke:  python -m experiments.run --config experiments/configs/finetune.py:smoke

Without `init_from`, trial 0 pretrains the model on MNIST-5k (4,000 handwritten
digits, 28x28) and exports its weights with `cnnjax.save_weights`; then the
same ResNet-18 (width 16) learns scikit-learn's 8x8 digits, another source
and scan of the same task, three ways: fine-tuning every layer, the classifier
alone on the frozen body, and from a random init.
"""

import ml_collections

from cnnjax import train
from experiments.configs import _smoke


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "finetune"
  config.kind = "finetune"
  config.description = "ResNet-18 (width 16): pretrained on MNIST-5k, fine-tuned on 8x8 digits"
  # Ray resources of one trial under --launcher=ray ("GPU=1", "CPU=4", "GPU=1,CPU=8").
  config.trial_resources = "CPU=1"
  # A weights file (.safetensors, .pth, .npz) in torchvision's or timm's names; empty:
  # pretrain on `pretrain` first.
  config.init_from = ""
  t = train.default_config()
  t.model = "resnet18"
  t.model_overrides.width = 16
  t.data.dataset = "digits"
  t.data.image_size = 28
  t.data.train_crop, t.data.pad, t.data.flip = "pad_crop", 2, False
  t.data.mean, t.data.std = (0.5,), (0.5,)
  t.batch_size = 32
  t.num_epochs = 2.0
  t.optimizer.name = "sgd"
  t.optimizer.learning_rate = 0.02
  t.optimizer.weight_decay = 5e-4
  t.eval_every_epochs = 1.0
  # The pretraining trial: the fields of the training config that differ from `train`.
  config.pretrain = ml_collections.ConfigDict({
      "data": {"dataset": "mnist5k", "mean": (0.13,), "std": (0.31,)},
      "num_epochs": 3.0,
      "optimizer": {"learning_rate": 0.05, "warmup_epochs": 0.25},
  })
  if variant == "smoke":
    _smoke.on_digits(t, image_size=16, batch_size=16, num_steps=3)
    t.model_overrides.width = 4
    config.pretrain = ml_collections.ConfigDict({"num_steps": 4, "optimizer": {"learning_rate": 0.05}})
  elif variant != "full":
    raise ValueError(f"unknown variant {variant!r} of finetune; use full or smoke")
  config.train = t
  return config
