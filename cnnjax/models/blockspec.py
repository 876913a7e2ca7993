"""Stages as data: block strings, their decoder, and compound-scaling arithmetic.

A stage is written the way the original EfficientNet code writes it, e.g.
`"mb_r2_k3_s2_e6_i16_o24_se0.25"`: block type (`mb` inverted residual /
MBConv, `ds` depthwise-separable, `conv` plain 3x3), repeats, kernel, stride,
expansion ratio, input and output channels, squeeze-excite ratio. Everything
here is a pure function of its arguments.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from cnnjax.models.common import make_divisible

_FIELD = re.compile(r"^([a-z]+)([0-9.]+)$")
_KINDS = ("mb", "ds", "conv")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  kind: str
  repeats: int
  kernel: int
  stride: int
  expand_ratio: float = 1.0
  in_features: int | None = None
  out_features: int = 0
  se_ratio: float = 0.0


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One concrete block after scaling: what a module needs to build it."""
  kind: str
  kernel: int
  stride: int
  expand_ratio: float
  in_features: int
  out_features: int
  se_ratio: float
  drop_path: float
  stage: int


def decode_stage(text: str) -> StageSpec:
  """The `StageSpec` one stage string describes; `ValueError` naming a bad field.

  >>> decode_stage("mb_r2_k3_s22_e6_i16_o24_se0.25").repeats
  2
  """
  kind, *fields = text.split("_")
  if kind not in _KINDS:
    raise ValueError(f"stage {text!r}: block type {kind!r} is not one of {_KINDS}")
  values: dict[str, str] = {}
  for field in fields:
    match = _FIELD.match(field)
    if not match:
      raise ValueError(f"stage {text!r}: cannot parse field {field!r}")
    values[match.group(1)] = match.group(2)
  names = {"r": "repeats", "k": "kernel", "s": "stride", "e": "expand_ratio",
           "i": "in_features", "o": "out_features", "se": "se_ratio"}
  unknown = set(values) - set(names)
  if unknown:
    raise ValueError(f"stage {text!r}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
  for required in ("r", "k", "s", "o"):
    if required not in values:
      raise ValueError(f"stage {text!r}: missing field {required!r} ({names[required]})")
  stride = values["s"]
  # The original writes strides per axis ("s22"); square strides only here.
  if len(stride) == 2 and stride[0] == stride[1]:
    stride = stride[0]
  return StageSpec(
      kind=kind, repeats=int(values["r"]), kernel=int(values["k"]), stride=int(stride),
      expand_ratio=float(values.get("e", 1)),
      in_features=int(values["i"]) if "i" in values else None,
      out_features=int(values["o"]), se_ratio=float(values.get("se", 0.0)))


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """EfficientNet's channel rounding: nearest multiple of 8, never below 90%."""
  return make_divisible(filters * width, divisor)


def round_repeats(repeats: int, depth: float) -> int:
  """EfficientNet's depth rounding: ceil(depth * repeats)."""
  return int(math.ceil(depth * repeats))


def expand_stages(stages: Sequence[str], stem_features: int, width: float = 1.0,
                  depth: float = 1.0, drop_path: float = 0.0,
                  divisor: int = 8) -> list[BlockSpec]:
  """Decodes, scales and unrolls stages into one spec per block.

  Only the first block of a stage strides and changes width. The stochastic
  depth rate rises linearly with the global block index: drop_path * i / n.
  """
  decoded = [decode_stage(s) for s in stages]
  repeats = [round_repeats(s.repeats, depth) for s in decoded]
  total = sum(repeats)
  blocks: list[BlockSpec] = []
  in_features = round_filters(stem_features, width, divisor)
  for stage_index, (stage, count) in enumerate(zip(decoded, repeats)):
    if stage.in_features is not None and round_filters(stage.in_features, width, divisor) != in_features:
      raise ValueError(
          f"stage {stage_index + 1} declares {stage.in_features} input channels but follows "
          f"a stage with {in_features}")
    out_features = round_filters(stage.out_features, width, divisor)
    for index in range(count):
      blocks.append(BlockSpec(
          kind=stage.kind, kernel=stage.kernel, stride=stage.stride if index == 0 else 1,
          expand_ratio=stage.expand_ratio, in_features=in_features, out_features=out_features,
          se_ratio=stage.se_ratio, drop_path=drop_path * len(blocks) / total,
          stage=stage_index))
      in_features = out_features
  return blocks


# The paper's grid-search result on B0 (Tan & Le 2019, section 3.3).
PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA = 1.2, 1.1, 1.15


def compound_scale(phi: float, alpha: float = PAPER_ALPHA, beta: float = PAPER_BETA,
                   gamma: float = PAPER_GAMMA, base_resolution: int = 224) -> tuple[float, float, int]:
  """(width, depth, resolution) = (beta^phi, alpha^phi, round(base * gamma^phi))."""
  for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
    if not value >= 1.0:
      raise ValueError(f"compound scaling needs {name} >= 1, got {value!r}")
  return beta**phi, alpha**phi, int(round(base_resolution * gamma**phi))


def default_resolution(width: float, depth: float, alpha: float = PAPER_ALPHA,
                       beta: float = PAPER_BETA, gamma: float = PAPER_GAMMA,
                       base_resolution: int = 224) -> int:
  """The resolution compound scaling pairs with a (width, depth).

  phi is the least-squares fit of depth = alpha^phi and width = beta^phi in log
  space; the resolution is base * gamma^phi. It reproduces the official table
  to within a few percent up to B3 (B4 and up use larger resolutions there).
  """
  if not (width > 0 and depth > 0):
    raise ValueError(f"width and depth must be positive, got width={width!r}, depth={depth!r}")
  la, lb = math.log(alpha), math.log(beta)
  phi = (math.log(depth) * la + math.log(width) * lb) / (la * la + lb * lb)
  return int(round(base_resolution * gamma ** max(phi, 0.0)))
