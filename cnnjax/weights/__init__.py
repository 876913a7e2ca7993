"""Pretrained weights: torchvision and timm state dicts in and out of cnnjax models.

`load_weights(name, source)` returns the flax variables (`params`,
`batch_stats`) of `create_model(name)` from a `.safetensors`, PyTorch
(`.pth`/`.pt`/`.bin`) or `.npz` file, or a mapping of names to arrays. Which
library named the keys (torchvision or timm) is recognised from the keys
themselves. Loading is all or nothing: a missing or unexpected key, or a
shape that differs, is an error that names the key and both shapes, and
nothing is returned. With `num_classes=K` for a checkpoint whose classifier
has another number of classes, everything but the classifier is loaded and
the classifier is freshly initialised (and a warning says so).

`save_weights(name, variables, path)` writes the reference's own names and
layouts as safetensors, so PyTorch loads them back with the same logits.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from cnnjax import registry
from cnnjax.weights import formats, layouts
from cnnjax.weights.formats import WeightsError, read_safetensors, write_safetensors

__all__ = ["WeightsError", "head_paths", "load_weights", "read_safetensors", "save_weights",
           "torch_names", "write_safetensors"]

log = logging.getLogger("cnnjax.weights")

Path = tuple[str, ...]  # (collection, module..., leaf)
_SHOWN = 8  # keys listed in one error


def _layouts(name: str) -> tuple[layouts.Layout, ...]:
  family = registry.model_info(name).family
  if family not in layouts.LAYOUTS:
    known = sorted(n for n in registry.list_models()
                   if registry.model_info(n).family in layouts.LAYOUTS)
    raise WeightsError(
        f"{name!r} (family {family!r}) has no torchvision or timm counterpart, so there are no "
        f"pretrained weights to map. Models that load them: {', '.join(known)}. A cnnjax run's own "
        "checkpoints restore with cnnjax.train.evaluate_checkpoint or by resuming the run.")
  return layouts.LAYOUTS[family]


def _probe_size(name: str) -> int:
  return max(registry.model_info(name).min_input_size, 32)


def _shapes(model: nn.Module, name: str) -> dict[Path, jax.ShapeDtypeStruct]:
  """Every variable of `model` by (collection, module..., leaf), traced without computing."""
  size = _probe_size(name)
  channels = registry.model_info(name).channels
  key = jax.random.key(0)
  abstract = jax.eval_shape(
      lambda: model.init({"params": key, "dropout": key},
                         jnp.zeros((1, size, size, channels), jnp.float32)))
  return {tuple(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


@functools.lru_cache(maxsize=64)
def _model_shapes(name: str, num_classes: int, overrides: tuple) -> dict[Path, Any]:
  """`_shapes` of a registered model, cached: tracing EfficientNet-B7 takes seconds."""
  return _shapes(registry.create_model(name, num_classes=num_classes, **dict(overrides)), name)


def _frozen(value: Any) -> Any:
  return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _key(overrides: dict) -> tuple:
  """Overrides as a cache key (lists, e.g. VGG's `layers` from JSON, become tuples)."""
  return tuple(sorted((k, _frozen(v)) for k, v in overrides.items()))


def head_paths(name: str, num_classes: int | None = None, **overrides: Any) -> frozenset[Path]:
  """The variables whose shape depends on the number of classes: the classifier(s).

  Found by building the model for two class counts, so every family's head
  (and GoogLeNet's auxiliary classifiers) is found the same way.
  """
  num_classes = num_classes or registry.model_info(name).num_classes
  mine = _model_shapes(name, num_classes, _key(overrides))
  theirs = _model_shapes(name, num_classes + 1, _key(overrides))
  return frozenset(path for path in mine if mine[path].shape != theirs[path].shape)


def torch_names(model: nn.Module, name: str, layout: layouts.Layout,
                shapes: Mapping[Path, Any]) -> dict[Path, str]:
  """The state-dict key of every variable of `model` under `layout`."""
  names = {}
  for path in shapes:
    collection, *modules, leaf = path
    if (collection, leaf) not in layouts.LEAVES:
      raise WeightsError(f"{name}: variable {'/'.join(path)} has no PyTorch counterpart")
    try:
      module = layout.module_name(model, tuple(modules))
    except (KeyError, ValueError, IndexError, AttributeError, TypeError):
      raise WeightsError(
          f"{name}: the module {'/'.join(modules)} has no counterpart in {layout.library}'s "
          "layout (a model option the reference does not have?)") from None
    names[path] = f"{module}.{layouts.LEAVES[collection, leaf]}"
  return names


def _norm_modules(names: Mapping[Path, str]) -> set[str]:
  return {key.rsplit(".", 1)[0] for path, key in names.items() if path[0] == "batch_stats"}


def _pick_layout(model, name, candidates, shapes, checkpoint: Mapping[str, np.ndarray]):
  """The layout of `candidates` whose keys the checkpoint holds most of; an error when none."""
  best = None
  for layout in candidates:
    names = torch_names(model, name, layout, shapes)
    renamed = {layout.legacy(k): v for k, v in checkpoint.items()}
    hits = len(set(names.values()) & set(renamed))
    if best is None or hits > best[0]:
      best = (hits, layout, names, renamed)
  hits, layout, names, renamed = best
  if hits == 0:
    expected = list(names.values())[:4]
    found = list(checkpoint)[:4]
    libraries = " or ".join(sorted({lay.library for lay in candidates}))
    raise WeightsError(
        f"none of the {len(checkpoint)} keys of this checkpoint is a {name} key in {libraries}'s "
        f"layout: it holds e.g. {found}, {name} expects e.g. {expected}. Is it a checkpoint of "
        "another architecture?")
  return layout, names, renamed


def _problem_list(title: str, items: list[str]) -> str:
  shown = "; ".join(items[:_SHOWN])
  more = f"; and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
  return f"{title} ({len(items)}): {shown}{more}"


def load_weights(name: str, source: Any, num_classes: int | None = None, *, seed: int = 0,
                 **overrides: Any) -> dict[str, Any]:
  """The variables of `create_model(name, num_classes, **overrides)` from a checkpoint.

  `source`: a path to `.safetensors`, `.pth`/`.pt`/`.bin` (PyTorch, read with
  `weights_only=True` when torch is installed) or `.npz`, or a mapping of
  names to arrays or tensors. With `num_classes` given and different from the
  checkpoint's classifier, the classifier is initialised from `seed` instead.
  Returns `{"params": ..., "batch_stats": ...}` (float arrays in the model's
  parameter dtype); raises `WeightsError` without returning anything partial.
  """
  candidates = _layouts(name)  # a model without a counterpart fails before any reading
  model = registry.create_model(name, num_classes=num_classes, **overrides)
  shapes = _model_shapes(name, model.num_classes, _key(overrides))
  checkpoint = formats.read(source)
  layout, names, checkpoint = _pick_layout(model, name, candidates, shapes, checkpoint)
  heads = head_paths(name, model.num_classes, **overrides)
  expected_keys = set(names.values())
  norms = _norm_modules(names)
  unexpected = [key for key in checkpoint if key not in expected_keys
                and not (key.endswith(f".{layouts.BATCHES_TRACKED}")
                         and key.rsplit(".", 1)[0] in norms)
                and not layout.optional(model, key)]
  missing, mismatched, fresh = [], [], []
  for path, key in names.items():
    want = layouts.torch_shape(shapes[path].shape)
    if key not in checkpoint:
      if path in heads and num_classes is not None:  # a checkpoint saved without its head
        fresh.append(path)
      else:
        missing.append(f"{key} (shape {want})")
      continue
    have = tuple(checkpoint[key].shape)
    if have == want:
      continue
    if path in heads and num_classes is not None:
      fresh.append(path)
    else:
      hint = (" (the checkpoint has another number of classes: pass num_classes= to load_weights "
              "for a fresh classifier)" if path in heads else "")
      mismatched.append(f"{key}: checkpoint {have}, {name} expects {want}{hint}")
  problems = []
  if missing:
    problems.append(_problem_list("missing keys", missing))
  if unexpected:
    problems.append(_problem_list(
        "unexpected keys", [f"{k} (shape {tuple(checkpoint[k].shape)})" for k in unexpected]))
  if mismatched:
    problems.append(_problem_list("shapes that differ (PyTorch layout)", mismatched))
  if problems:
    raise WeightsError(
        f"the checkpoint does not fit {name} in {layout.library}'s layout, and nothing was "
        "loaded. " + ". ".join(problems) + ". Is it a checkpoint of another architecture or "
        "variant (e.g. another depth, width or class count)?")

  variables: dict[str, dict] = {}
  for path, key in names.items():
    if path in fresh:
      continue
    value = layouts.from_torch(np.asarray(checkpoint[key]))
    if not np.issubdtype(value.dtype, np.floating):
      raise WeightsError(f"{key} holds {value.dtype} values; weights must be floating point")
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = jnp.asarray(value, dtype=shapes[path].dtype)
  if fresh:
    initialised = _initialise(model, name, seed, frozenset(fresh))
    for path in fresh:
      node = variables
      for part in path[:-1]:
        node = node.setdefault(part, {})
      node[path[-1]] = initialised[path]
    keys = sorted({names[p] for p in fresh})
    log.warning("%s: the checkpoint's classifier (%s) is missing or has another number of "
                "classes; it was initialised afresh for %d classes (seed %d), everything else "
                "was loaded.", name, ", ".join(keys), model.num_classes, seed)
  return variables


def _initialise(model: nn.Module, name: str, seed: int, paths: frozenset[Path]) -> dict:
  """`paths` of a fresh `model.init`; XLA drops the initialisers of everything else."""
  size, channels = _probe_size(name), registry.model_info(name).channels
  key = jax.random.key(seed)

  @jax.jit
  def init():
    variables = model.init({"params": key, "dropout": key},
                           jnp.zeros((1, size, size, channels), jnp.float32))
    flat = {tuple(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
    return {path: flat[path] for path in paths}

  return init()


def save_weights(name: str, variables: Mapping[str, Any], path: str | os.PathLike, *,
                 overwrite: bool = False, **overrides: Any) -> pathlib.Path:
  """Writes `variables` of model `name` as a safetensors file in the reference's names and layouts.

  The number of classes is read from the classifier in `variables`;
  `overrides` are the model's constructor fields it was built with. An
  existing file is kept unless `overwrite=True`. Returns the path written.
  """
  path = pathlib.Path(path).expanduser()
  if path.suffix != ".safetensors":
    raise WeightsError(f"save_weights writes safetensors; name the file *.safetensors, got {path}")
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} exists; save_weights keeps it. Pass overwrite=True to replace "
                          "it, or choose another path.")
  given = {tuple(str(getattr(k, "key", k)) for k in p): np.asarray(leaf)
           for p, leaf in jax.tree_util.tree_leaves_with_path(
               {k: variables[k] for k in ("params", "batch_stats") if k in variables})}
  heads = head_paths(name, None, **overrides)
  kernels = [given[p] for p in sorted(heads) if p in given and p[-1] == "kernel"]
  num_classes = int(kernels[0].shape[-1]) if kernels else None
  model = registry.create_model(name, num_classes=num_classes, **overrides)
  shapes = _model_shapes(name, model.num_classes, _key(overrides))
  problems = [f"{'/'.join(p)}: missing" for p in shapes if p not in given]
  problems += [f"{'/'.join(p)}: not a variable of {name}" for p in given if p not in shapes]
  problems += [f"{'/'.join(p)}: shape {given[p].shape}, {name} has {tuple(shapes[p].shape)}"
               for p in shapes if p in given and given[p].shape != tuple(shapes[p].shape)]
  if problems:
    raise WeightsError(f"these are not the variables of {name}" +
                       (f" with {overrides}" if overrides else "") + ": " +
                       _problem_list("problems", problems))
  layout = _layouts(name)[0]
  names = torch_names(model, name, layout, shapes)
  tensors = {key: layouts.to_torch(given[p].astype(np.float32)) for p, key in names.items()}
  for module in _norm_modules(names):
    tensors[f"{module}.{layouts.BATCHES_TRACKED}"] = np.zeros((), np.int64)
  write_safetensors(path, tensors, {"format": "pt", "cnnjax_model": name})
  return path
