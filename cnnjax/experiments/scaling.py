"""EfficientNet compound scaling as trials (Tan & Le 2019, section 3.3).

Step 1: at phi = 1, every (alpha, beta, gamma) >= 1 on a grid with
alpha * beta^2 * gamma^2 within `tolerance` of 2 is a candidate; each is
trained and the best by accuracy wins. Step 2: with the winner, phi = 1..N
scales depth by alpha^phi, width by beta^phi and resolution by gamma^phi; at
the FLOPs each compound point measures, baselines scale only width, only depth
or only resolution (the coefficient found by bisection on measured FLOPs).
`official` mode uses the B0–B7 table's ratios instead of the phi rule.
All of it starts from a small base network shaped like B0.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

from cnnjax.experiments.sweep import Trial
from cnnjax.models.efficientnet import VARIANTS as OFFICIAL_VARIANTS

METHODS = ("compound", "width", "depth", "resolution")
# A single-dimension baseline trained again with its residual branches zero-initialised
# (`zero_init_residual`) is its own method: "<method>_zero_init".
ZERO_INIT_SUFFIX = "_zero_init"


class ScalingConfigError(ValueError):
  """Coefficients or sizes that cannot work; raised before anything trains."""


@dataclasses.dataclass(frozen=True)
class Base:
  width: float
  depth: float
  resolution: int
  min_resolution: int = 32


@dataclasses.dataclass(frozen=True)
class Point:
  method: str
  phi: float
  alpha: float
  beta: float
  gamma: float
  width: float
  depth: float
  resolution: int
  # When fitted to a FLOPs target: the exponent that was applied to (alpha, beta, gamma).
  exponent: float | None = None
  # Residual blocks start as the identity (the model's `zero_init_residual`).
  zero_init_residual: bool = False

  def trial(self, stage: str) -> Trial:
    name = (f"{stage}-{self.method}-phi{self.phi:g}-a{self.alpha:.3f}-b{self.beta:.3f}-"
            f"g{self.gamma:.3f}")
    overrides = {"model": "efficientnet", "model_overrides.width": self.width,
                 "model_overrides.depth": self.depth, "data.image_size": self.resolution}
    if self.zero_init_residual:  # only then: the trials published before it keep their configs
      overrides["model_overrides.zero_init_residual"] = True
    return Trial(name, overrides, {"stage": stage, **dataclasses.asdict(self)})

  def zero_init_twin(self) -> Point:
    """The same network with its residual branches zero-initialised, as its own method."""
    return dataclasses.replace(self, method=self.method + ZERO_INIT_SUFFIX,
                               zero_init_residual=True)


def flops_product(alpha: float, beta: float, gamma: float) -> float:
  return alpha * beta**2 * gamma**2


def grid_candidates(alphas: Sequence[float], betas: Sequence[float], gammas: Sequence[float],
                    target: float = 2.0, tolerance: float = 0.1) -> list[tuple[float, float, float]]:
  """Every grid point with all coefficients >= 1 and |alpha beta^2 gamma^2 - target| <= tolerance."""
  for name, values in (("alpha", alphas), ("beta", betas), ("gamma", gammas)):
    if not values:
      raise ScalingConfigError(f"the {name} grid is empty")
    low = [v for v in values if not v >= 1.0]
    if low:
      raise ScalingConfigError(f"compound scaling needs {name} >= 1 (scaling up); the grid has "
                               f"{low}")
  if not (target > 1 and tolerance >= 0):
    raise ScalingConfigError(f"need target > 1 and tolerance >= 0, got {target}, {tolerance}")
  combos = list(itertools.product(alphas, betas, gammas))
  kept = [c for c in combos if abs(flops_product(*c) - target) <= tolerance]
  if not kept:
    closest = min(combos, key=lambda c: abs(flops_product(*c) - target))
    raise ScalingConfigError(
        f"no grid point satisfies alpha*beta^2*gamma^2 = {target} +- {tolerance}: the closest, "
        f"{closest}, gives {flops_product(*closest):.3f}. Widen the tolerance or refine the grid.")
  return sorted(kept)


def compound_point(base: Base, alpha: float, beta: float, gamma: float, phi: float,
                   method: str = "compound") -> Point:
  return Point(method, phi, alpha, beta, gamma, width=base.width * beta**phi,
               depth=base.depth * alpha**phi, resolution=int(round(base.resolution * gamma**phi)))


def check_resolution(base: Base, points: Sequence[Point]) -> None:
  small = [p for p in points if p.resolution < base.min_resolution]
  if small:
    raise ScalingConfigError(
        f"resolution {small[0].resolution} is below the network's minimum of "
        f"{base.min_resolution} pixels (trial {small[0].method}, phi={small[0].phi}); raise the "
        "base resolution")


def single_dimension_point(base: Base, method: str, phi: float, target_flops: float,
                           flops_of: Callable[[Point], float], iterations: int = 7) -> Point:
  """Scales only `method`'s dimension until the measured FLOPs meet `target_flops`.

  FLOPs grow about as width^2, depth and resolution^2, which gives the first
  guess; bisection in log space on measured FLOPs (rounding included) refines it.
  """
  if method not in ("width", "depth", "resolution"):
    raise ValueError(f"unknown single-dimension method {method!r}")

  def point(factor: float) -> Point:
    return Point(method, phi, 1.0, 1.0, 1.0,
                 width=base.width * (factor if method == "width" else 1.0),
                 depth=base.depth * (factor if method == "depth" else 1.0),
                 resolution=int(round(base.resolution * (factor if method == "resolution" else 1))))

  base_flops = flops_of(point(1.0))
  power = 1.0 if method == "depth" else 0.5
  guess = max(1.0, (target_flops / base_flops) ** power)
  low, high = max(1.0, guess / 1.5), guess * 1.5
  while flops_of(point(high)) < target_flops:
    low, high = high, high * 1.5
    if high > 64:
      raise ScalingConfigError(f"scaling {method} alone cannot reach {target_flops:.3g} FLOPs")
  for _ in range(iterations):
    middle = math.sqrt(low * high)
    if flops_of(point(middle)) < target_flops:
      low = middle
    else:
      high = middle
  best = min((point(low), point(high)), key=lambda p: abs(math.log(flops_of(p) / target_flops)))
  factor = {"width": best.width / base.width, "depth": best.depth / base.depth,
            "resolution": best.resolution / base.resolution}[method]
  return dataclasses.replace(best, **{{"width": "beta", "depth": "alpha",
                                       "resolution": "gamma"}[method]: factor})


# Matched points may differ from their FLOPs target by at most this fraction.
FLOPS_TOLERANCE = 0.05


def fit_to_flops(base: Base, alpha: float, beta: float, gamma: float, phi: float,
                 target_flops: float, flops_of: Callable[[Point], float],
                 tolerance: float = FLOPS_TOLERANCE, iterations: int = 14) -> Point:
  """The compound point whose measured FLOPs meet `target_flops`: phi's exponent, fitted.

  The nominal point (alpha^phi, beta^phi, gamma^phi) misses its FLOPs on a
  small network: whole repeats, whole pixels and channel rounding quantise it,
  and the stem, head and classifier do not scale as width^2 depth res^2. The
  exponent e applied to all three coefficients is found by bisection on
  measured FLOPs, which keeps the candidate's proportions; if the quantised
  steps still leave it more than `tolerance` away, the width alone is then
  fine-tuned (it moves FLOPs in the smallest steps). Raises when even that
  cannot get within `tolerance`.
  """
  def at(exponent: float, width_factor: float = 1.0) -> Point:
    point = compound_point(base, alpha, beta, gamma, exponent)
    return dataclasses.replace(point, phi=phi, exponent=exponent,
                               width=point.width * width_factor)

  def miss(point: Point) -> float:
    return flops_of(point) / target_flops - 1.0

  low, high = 0.0, max(2.0 * phi, 1.0)
  while miss(at(high)) < 0:
    low, high = high, high * 1.5
    if high > 16 * max(phi, 1.0):
      raise ScalingConfigError(f"compound ({alpha}, {beta}, {gamma}) cannot reach "
                               f"{target_flops:.3g} FLOPs")
  for _ in range(iterations):
    middle = 0.5 * (low + high)
    if miss(at(middle)) < 0:
      low = middle
    else:
      high = middle
  best = min((at(low), at(high)), key=lambda p: abs(miss(p)))
  if abs(miss(best)) > tolerance:
    exponent = best.exponent
    low_w, high_w = 0.7, 1.4
    for _ in range(iterations):
      middle = math.sqrt(low_w * high_w)
      if miss(at(exponent, middle)) < 0:
        low_w = middle
      else:
        high_w = middle
    best = min((best, at(exponent, low_w), at(exponent, high_w)), key=lambda p: abs(miss(p)))
  if abs(miss(best)) > tolerance:
    raise ScalingConfigError(
        f"compound ({alpha}, {beta}, {gamma}) at phi={phi} gets no closer than "
        f"{100 * miss(best):+.1f}% to its {target_flops:.3g} FLOPs; use a finer "
        "channel_divisor or a larger base network")
  return best


def official_points(base: Base, phis: Sequence[int]) -> list[Point]:
  """B0–B7's own (width, depth, resolution) ratios to B0, applied to the base."""
  table = list(OFFICIAL_VARIANTS.values())
  points = []
  for phi in phis:
    if not 0 <= phi < len(table):
      raise ScalingConfigError(f"the official table has B0–B7; phi={phi} is outside it")
    width, depth, resolution, *_ = table[phi]
    points.append(Point("official", phi, depth, width, resolution / 224,
                        base.width * width, base.depth * depth,
                        int(round(base.resolution * resolution / 224))))
  return points
