"""cnnjax: classic convolutional networks in JAX/Flax.

The notebook API: `list_models`, `create_model`, `model_info`, and the
convolution arithmetic `count_params`, `flops`, `summary`.
"""

from cnnjax.analysis import Summary, count_params, flops, summary
from cnnjax.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = [
    "ModelInfo",
    "Summary",
    "count_params",
    "create_model",
    "flops",
    "list_models",
    "model_info",
    "register_model",
    "summary",
]
__version__ = "0.1.0"
