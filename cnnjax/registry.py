"""The model registry: names, per-variant facts, and construction.

`register_model` attaches a frozen `ModelInfo` to a factory that returns a
`flax.linen` module; `create_model` builds one by name with validated
overrides; `list_models` and `model_info` answer questions about the zoo.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable
from typing import Any

from flax import linen as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a data pipeline and a report need to know about one variant."""
  name: str
  family: str
  paper: str
  input_size: int = 224
  min_input_size: int = 1
  channels: int = 3
  num_classes: int = 1000
  crop_fraction: float = 0.875
  interpolation: str = "bilinear"
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  # Key of this variant in shared/reference/models.json, when it has one.
  reference: str | None = None


@dataclasses.dataclass(frozen=True)
class _Entry:
  factory: Callable[..., nn.Module]
  info: ModelInfo


_REGISTRY: dict[str, _Entry] = {}


def register_model(name: str, **info: Any) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
  """A decorator registering `factory(**overrides) -> nn.Module` under `name`.

  `info` are the fields of `ModelInfo` other than `name` (input size, mean and std, the
  paper...). Returns the factory unchanged. Raises `ValueError` where `name` is taken.
  """

  def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
      raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = _Entry(factory, ModelInfo(name=name, **info))
    return factory

  return decorator


def _entry(name: str) -> _Entry:
  _ensure_models_imported()
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f" Closest: {', '.join(close)}." if close else ""
    raise ValueError(
        f"Unknown model {name!r}.{hint} cnnjax.list_models() lists all "
        f"{len(_REGISTRY)} models.")
  return _REGISTRY[name]


def list_models(pattern: str = "*") -> list[str]:
  """The registered names matching the shell-style `pattern`, sorted.

  >>> cnnjax.list_models("resnet1*")
  ['resnet101', 'resnet110', 'resnet152', 'resnet18']
  """
  _ensure_models_imported()
  return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_info(name: str) -> ModelInfo:
  """The frozen facts of the registered model `name` (a `ModelInfo`): its input size, crop
  fraction, interpolation, mean and std, number of classes, channels, paper. Raises
  `ValueError` for an unknown name, with the closest registered ones.

  >>> info = cnnjax.model_info("efficientnet_b3")
  >>> info.input_size, info.crop_fraction, info.interpolation
  (300, 0.904, 'bicubic')
  """
  return _entry(name).info


def create_model(name: str, num_classes: int | None = None, **overrides: Any) -> nn.Module:
  """A new `flax.linen` module of the registered model `name`.

  `num_classes` (a positive int) defaults to the variant's own (1000 for the ImageNet
  models, 10 for the CIFAR ResNets); `overrides` are fields of the module (`dtype`,
  `widths`, `zero_init_residual`...). Raises `ValueError` for an unknown name, a bad
  `num_classes` or an unknown field, naming the closest valid ones.

  >>> model = cnnjax.create_model("resnet20", num_classes=10, widths=(8, 16, 32))
  >>> cnnjax.create_model("resnet20", widht=2)
  Traceback (most recent call last):
  ...
  ValueError: Unknown option(s) for model 'resnet20': 'widht' (did you mean 'widths'?)...
  """
  entry = _entry(name)
  if num_classes is None:
    num_classes = entry.info.num_classes
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  module = entry.factory(num_classes=num_classes)
  fields = {f.name for f in dataclasses.fields(module) if f.init and f.name not in ("parent", "name")}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    suggestions = []
    for key in unknown:
      close = difflib.get_close_matches(key, sorted(fields), n=1)
      suggestions.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ValueError(
        f"Unknown option(s) for model {name!r}: {', '.join(suggestions)}. "
        f"Valid options: {', '.join(sorted(fields))}.")
  return module.clone(**overrides) if overrides else module


def _ensure_models_imported() -> None:
  # Importing the families registers them; done lazily so that importing
  # cnnjax.registry alone stays cheap and cycle-free.
  import cnnjax.models  # noqa: F401
