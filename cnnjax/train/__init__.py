"""Training: configuration, state, compiled steps, optimizers, checkpoints, the loop.

`default_config`, `train_and_evaluate`, `evaluate_checkpoint` and `NonFiniteLossError` load on first
use, so `from cnnjax.train import steps` needs neither ml_collections nor the
data stack (TFDS, grain): enough for a benchmark on a bare accelerator image.
"""

import importlib

_LAZY = {"default_config": "cnnjax.train.config", "train_and_evaluate": "cnnjax.train.loop",
         "evaluate_checkpoint": "cnnjax.train.loop", "NonFiniteLossError": "cnnjax.train.loop"}

__all__ = ["NonFiniteLossError", "default_config", "evaluate_checkpoint", "train_and_evaluate"]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'cnnjax.train' has no attribute {name!r}")
