"""Training: configuration, state, compiled steps, optimizers, checkpoints, the loop."""

from cnnjax.train.config import default_config
from cnnjax.train.loop import NonFiniteLossError, train_and_evaluate

__all__ = ["NonFiniteLossError", "default_config", "train_and_evaluate"]
