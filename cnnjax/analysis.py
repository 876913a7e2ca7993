"""Convolution arithmetic of any model: parameters, FLOPs, receptive fields.

Everything is read from the jaxpr of `model.apply` at inference, traced on
abstract shapes (nothing is allocated, so VGG-19 and EfficientNet-B7 cost the
same to analyse):
- multiply-adds of every `conv_general_dilated` (output elements x kernel
  window x input channels per group) and `dot_general` (output elements x
  contracted size); FLOPs are 2 per multiply-add, the reference file's
  convention (pooling, normalisation and activations count as free);
- receptive field and effective stride ("jump") propagated through
  convolutions and pooling windows: rf' = rf + (k - 1) * jump, jump' = jump * s;
  elementwise joins (residual adds, concatenations) take the larger field, and
  anything that mixes all positions (global pooling, flatten) makes the field
  global, except per-channel gates broadcast over positions (squeeze-excite);
- layer names from the Flax module path each primitive was traced under.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.extend import core as jex_core

from cnnjax.models import lowering

GLOBAL = math.inf


@dataclasses.dataclass(frozen=True)
class _Field:
  """Receptive field (pixels) and jump (input pixels per output step) of a map."""
  rf: float
  jump: float

  def join(self, other: _Field | None) -> _Field:
    if other is None:
      return self
    return _Field(max(self.rf, other.rf), max(self.jump, other.jump))


_GLOBAL_FIELD = _Field(GLOBAL, GLOBAL)


@dataclasses.dataclass
class LayerRow:
  name: str
  kind: str
  output_shape: tuple[int, ...]
  params: int = 0
  macs: int = 0
  receptive_field: float = 1.0
  stride: float = 1.0


@dataclasses.dataclass
class Summary:
  """Per-layer table and totals, printable (`print(summary)`)."""
  model: str
  input_shape: tuple[int, ...]
  rows: list[LayerRow]
  total_params: int
  total_macs: int

  @property
  def flops(self) -> int:
    return 2 * self.total_macs

  def table(self) -> str:
    def fmt_field(value: float) -> str:
      return "global" if value == GLOBAL else f"{int(value)}"

    header = ("layer", "kind", "output", "params", "MACs", "RF", "stride")
    lines = [header] + [
        (row.name, row.kind, "x".join(map(str, row.output_shape[1:])), f"{row.params:,}",
         f"{row.macs:,}", fmt_field(row.receptive_field), fmt_field(row.stride))
        for row in self.rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    right = {3, 4, 5, 6}

    def render(line):
      return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths)))

    rule = "-" * len(render(header))
    body = [render(header), rule] + [render(line) for line in lines[1:]] + [rule]
    body.append(f"{self.model} on {'x'.join(map(str, self.input_shape))}: "
                f"{self.total_params:,} parameters, {self.total_macs:,} MACs "
                f"({self.flops / 1e9:.3f} GFLOPs)")
    return "\n".join(body)

  def __str__(self) -> str:
    return self.table()


def count_params(variables: Any) -> int:
  """The number of trainable parameters in `variables` (a flax variables dict, or any
  pytree of arrays): the 'params' collection where there is one, else every leaf.

  >>> model = cnnjax.create_model("resnet20")
  >>> cnnjax.count_params(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  269722
  """
  if isinstance(variables, dict) or hasattr(variables, "keys"):
    if "params" in variables:
      variables = variables["params"]
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(variables)))


def _normalise_shape(input_shape: int | Sequence[int], channels: int = 3) -> tuple[int, ...]:
  if isinstance(input_shape, int):
    return (1, input_shape, input_shape, channels)
  shape = tuple(int(s) for s in input_shape)
  if len(shape) == 3:
    return (1,) + shape
  if len(shape) == 4:
    return shape
  raise ValueError(f"input_shape must be a size, (H, W, C) or (N, H, W, C); got {input_shape!r}")


def _param_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[str, int]:
  """'a/b/c' -> parameter count of the leaf module at that path."""
  counts: dict[str, int] = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      counts.update(_param_paths(value, prefix + (key,)))
    else:
      path = "/".join(prefix)
      counts[path] = counts.get(path, 0) + int(np.prod(value.shape))
  return counts


def _is_gate(shape, out_shape) -> bool:
  """A per-channel value spread over positions (squeeze-excite's gate).

  It rescales each position by a global summary without widening the local
  field, so receptive fields ignore it (as the classic calculations do).
  """
  return (len(shape) == 4 and len(out_shape) == 4 and tuple(shape[1:3]) == (1, 1)
          and tuple(out_shape[1:3]) != (1, 1))


def _sub_jaxprs(eqn) -> list:
  jaxprs = []
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if sub is None:
      continue
    jaxprs.append(sub.jaxpr if hasattr(sub, "jaxpr") else sub)
  return jaxprs


class _Walker:
  """Propagates receptive fields through a jaxpr and collects layer rows."""

  def __init__(self, param_counts: dict[str, int], root: str):
    self.param_counts = param_counts
    self.root = root
    self.rows: dict[str, LayerRow] = {}
    self.pool_count = 0

  def path(self, eqn, prefix: str) -> str:
    stack = str(eqn.source_info.name_stack)
    full = "/".join(p for p in (prefix, stack) if p)
    parts = full.split("/")
    if parts and parts[0] == self.root:
      parts = parts[1:]
    # Transformations (jvp, pjit names) add their own entries; keep module names.
    return "/".join(p for p in parts if p and not p.startswith(("jvp(", "pjit(", "transpose(")))

  def row(self, name: str, kind: str, shape) -> LayerRow:
    if name not in self.rows:
      self.rows[name] = LayerRow(name=name, kind=kind, output_shape=tuple(shape),
                                 params=self.param_counts.get(name, 0))
    return self.rows[name]

  def walk(self, jaxpr, fields: dict, prefix: str = "") -> None:
    for eqn in jaxpr.eqns:
      inputs = [fields.get(v) if not isinstance(v, jex_core.Literal) else None for v in eqn.invars]
      subs = _sub_jaxprs(eqn)
      if subs:
        sub = subs[0]
        inner = dict(zip(sub.invars, inputs))
        self.walk(sub, inner, "/".join(p for p in (prefix, str(eqn.source_info.name_stack)) if p))
        for outer, inner_var in zip(eqn.outvars, sub.outvars):
          fields[outer] = inner.get(inner_var) if not isinstance(inner_var, jex_core.Literal) else None
        continue
      out = self._propagate(eqn, inputs)
      for var in eqn.outvars:
        fields[var] = out
      self._record(eqn, prefix, out)

  def _propagate(self, eqn, inputs) -> _Field | None:
    name = eqn.primitive.name
    out_shape = eqn.outvars[0].aval.shape
    in_shape = eqn.invars[0].aval.shape
    joined = None
    for var, field in zip(eqn.invars, inputs):
      if field is None or _is_gate(var.aval.shape, out_shape):
        continue
      joined = field if joined is None else joined.join(field)
    if joined is None:
      return None
    if joined.rf == GLOBAL:
      return _GLOBAL_FIELD
    if name == "conv_general_dilated":
      lhs = inputs[0] or joined
      dims = eqn.params["dimension_numbers"]
      rhs_shape = eqn.invars[1].aval.shape
      kernel = rhs_shape[dims.rhs_spec[2]]
      dilation = eqn.params["rhs_dilation"][0]
      stride = eqn.params["window_strides"][0]
      extent = dilation * (kernel - 1) + 1
      return _Field(lhs.rf + (extent - 1) * lhs.jump, lhs.jump * stride)
    if name.startswith("reduce_window"):
      window = eqn.params["window_dimensions"]
      strides = eqn.params["window_strides"]
      if len(window) == 4:
        return _Field(joined.rf + (window[1] - 1) * joined.jump, joined.jump * strides[1])
      return joined
    if len(out_shape) != 4 and len(in_shape) == 4:
      return _GLOBAL_FIELD  # flatten or a reduction over positions
    if name in ("reduce_sum", "reduce_max", "reduce_min", "argmax", "reduce_prod"):
      axes = eqn.params.get("axes", ())
      if 1 in axes or 2 in axes:
        return _GLOBAL_FIELD
    if len(out_shape) == 4 and len(in_shape) == 4 and name in ("slice", "gather"):
      # Strided slicing (option-A shortcuts) subsamples positions.
      strides = eqn.params.get("strides") or (1, 1, 1, 1)
      return _Field(joined.rf, joined.jump * (strides[1] or 1))
    return joined

  def _record(self, eqn, prefix: str, field: _Field | None) -> None:
    name = eqn.primitive.name
    path = self.path(eqn, prefix)
    out_shape = eqn.outvars[0].aval.shape
    if name == "conv_general_dilated":
      dims = eqn.params["dimension_numbers"]
      rhs_shape = eqn.invars[1].aval.shape
      window = int(np.prod([rhs_shape[d] for d in dims.rhs_spec[2:]]))
      in_per_group = rhs_shape[dims.rhs_spec[1]]
      groups = eqn.params["feature_group_count"]
      kind = "dwconv" if groups > 1 and in_per_group == 1 else ("gconv" if groups > 1 else "conv")
      row = self.row(path, kind, out_shape)
      row.macs += int(np.prod(out_shape)) * window * in_per_group
    elif name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      row = self.row(path, "dense", out_shape)
      row.macs += int(np.prod(out_shape)) * int(np.prod([lhs_shape[d] for d in contract]))
    elif name.startswith("reduce_window") and len(out_shape) == 4:
      window = eqn.params["window_dimensions"]
      if window[1] == 1 and window[2] == 1:
        return  # a window across channels only (local response normalisation)
      self.pool_count += 1
      kind = "maxpool" if "max" in name else "avgpool"
      row = self.row("/".join(p for p in (path, f"{kind}{self.pool_count}") if p), kind, out_shape)
    elif path in self.param_counts:
      row = self.row(path, "norm" if path.split("/")[-1].startswith("bn") else "layer", out_shape)
    else:
      return
    if path in self.param_counts or row.kind.endswith("pool"):
      row.output_shape = tuple(out_shape)
      if field is not None:
        row.receptive_field, row.stride = field.rf, field.jump


def _trace(model: nn.Module, input_shape, channels: int):
  shape = _normalise_shape(input_shape, channels)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  # The reference lowering: one convolution primitive per layer, whatever runs.
  with lowering.use("xla"):
    variables = jax.eval_shape(lambda: model.init(rngs, jnp.zeros(shape), train=False))
    closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return shape, variables, closed


def summary(model: nn.Module, input_shape: int | Sequence[int] = 224) -> Summary:
  """The per-layer `Summary` of `model` on one image of `input_shape` (a size, (H, W) or
  (H, W, C)): each layer's output shape, parameters, MACs, receptive field and stride;
  `print` it for the table. Raises `ValueError` where the image is too small for the model,
  naming the smallest size that works.
  """
  shape, variables, closed = _trace(model, input_shape, _channels(input_shape))
  param_counts = _param_paths(variables.get("params", {}))
  walker = _Walker(param_counts, type(model).__name__)
  jaxpr = closed.jaxpr
  # The apply function's last input is the image; parameters carry no field.
  fields = {jaxpr.invars[-1]: _Field(1.0, 1.0)}
  walker.walk(jaxpr, fields)
  rows = list(walker.rows.values())
  unused = {p: n for p, n in param_counts.items() if p not in walker.rows}
  for path, count in unused.items():
    rows.append(LayerRow(name=path, kind="train-only", output_shape=(), params=count,
                         receptive_field=GLOBAL, stride=GLOBAL))
  return Summary(model=type(model).__name__, input_shape=shape, rows=rows,
                 total_params=count_params(variables),
                 total_macs=sum(row.macs for row in rows))


def _channels(input_shape) -> int:
  return 3 if isinstance(input_shape, int) else int(input_shape[-1])


def flops(model: nn.Module, input_shape: int | Sequence[int] = 224) -> int:
  """Forward FLOPs of `model` at inference on one image of `input_shape` (a size, (H, W)
  or (H, W, C)): 2 per multiply-add of convolutions and matmuls, from the traced program.

  >>> cnnjax.flops(cnnjax.create_model("resnet20"), 32)
  81102080
  """
  return summary(model, input_shape).flops


def zoo_table(pattern: str = "*") -> str:
  """Parameters and inference GFLOPs of every registered model at its own size."""
  from cnnjax.registry import create_model, list_models, model_info

  lines = [f"{'model':20s} {'family':14s} {'input':>5s} {'params':>13s} {'GFLOPs':>8s}  paper"]
  for name in list_models(pattern):
    info = model_info(name)
    model = create_model(name)
    size = getattr(model, "input_size", None) or info.input_size
    table = summary(model, (size, size, info.channels))
    lines.append(f"{name:20s} {info.family:14s} {size:5d} {table.total_params:13,d} "
                 f"{table.flops / 1e9:8.3f}  {info.paper[:60]}")
  return "\n".join(lines)
