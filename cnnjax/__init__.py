"""cnnjax: classic convolutional networks in JAX/Flax.

The notebook API: `list_models`, `create_model`, `model_info`, the
convolution arithmetic `count_params`, `flops`, `summary`, and pretrained
weights in torchvision's and timm's names: `load_weights`, `save_weights`.

Importing cnnjax makes two process-wide settings, each documented in its module
and each with an opt-out:

- `cnnjax.xla_cpu`: XLA:CPU keeps convolutions with XLA rather than YNNPACK, so
  a plain `jax.jit` of a model compiles as cnnjax's own steps do
  (`CNNJAX_XLA_FLAGS=0` opts out);
- `cnnjax.host_allocator`: XLA's heap size (in `XLA_FLAGS`) and glibc's malloc
  settings keep XLA:CPU's step buffers in each thread's heap for the next step
  instead of faulting them in again (`CNNJAX_HOST_ALLOCATOR=0` opts out). Import
  cnnjax before the first JAX computation for it to take effect.
"""

from cnnjax import host_allocator, xla_cpu

xla_cpu.apply()
host_allocator.apply()

from cnnjax.analysis import Summary, count_params, flops, summary  # noqa: E402
from cnnjax.registry import (  # noqa: E402
    ModelInfo, create_model, list_models, model_info, register_model)
from cnnjax.weights import load_weights, save_weights  # noqa: E402

__all__ = [
    "ModelInfo",
    "Summary",
    "count_params",
    "create_model",
    "flops",
    "list_models",
    "load_weights",
    "model_info",
    "register_model",
    "save_weights",
    "summary",
]
__version__ = "0.1.0"
