"""Optimizers and learning-rate schedules built from config.

The learning rate is the product of a peak value and a schedule shape in
[0, 1]. Peak learning rate and weight decay enter the optimizer state as
values (`optax.inject_hyperparams`), so trials of a sweep that change them
reuse one compiled step.

Optimizers: `sgd` (momentum, Nesterov), `rmsprop_tf` (the original
EfficientNet's: epsilon inside the square root, accumulator starting at 1,
momentum applied after the learning rate), `adam`, `adamw`, `lars`, `lamb`.
Weight decay is `coupled` (an L2 term in the loss, see `l2_penalty`) or
`decoupled` (applied to the update, AdamW-style); either way it skips
BatchNorm parameters and biases (`decay_mask`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "rmsprop_tf", "adam", "adamw", "lars", "lamb")
SCHEDULES = ("constant", "multistep", "cosine", "exponential")
WEIGHT_DECAY_MODES = ("coupled", "decoupled")


def decay_mask(params: Any) -> Any:
  """True for kernels (rank > 1); BatchNorm scales/offsets and biases are rank 1."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def l2_penalty(params: Any, weight_decay: jax.Array) -> jax.Array:
  """weight_decay * sum(p^2) / 2 over the masked parameters (TF's l2_loss)."""
  leaves = [p for p, keep in zip(jax.tree.leaves(params), jax.tree.leaves(decay_mask(params))) if keep]
  return weight_decay * 0.5 * sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in leaves)


def schedule_shape(name: str, total_steps: int, steps_per_epoch: int, warmup_epochs: float = 0.0,
                   boundaries_epochs: Sequence[float] = (), decay_factor: float = 0.1,
                   decay_epochs: float = 2.4, decay_rate: float = 0.97,
                   final_fraction: float = 0.0) -> Callable[[jax.Array], jax.Array]:
  """A multiplier in [0, 1] per step: linear warmup, then the named decay."""
  if name not in SCHEDULES:
    raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
  if total_steps < 1 or steps_per_epoch < 1:
    raise ValueError(f"total_steps and steps_per_epoch must be positive, got {total_steps}, "
                     f"{steps_per_epoch}")
  warmup = int(round(warmup_epochs * steps_per_epoch))
  if warmup >= total_steps and warmup > 0:
    raise ValueError(f"warmup ({warmup} steps from warmup_epochs={warmup_epochs}) must be shorter than "
                     f"training ({total_steps} steps)")
  if name == "constant":
    decay = optax.constant_schedule(1.0)
  elif name == "multistep":
    decay = optax.piecewise_constant_schedule(
        1.0, {int(round(e * steps_per_epoch)) - warmup: decay_factor for e in boundaries_epochs})
  elif name == "cosine":
    decay = optax.cosine_decay_schedule(1.0, max(total_steps - warmup, 1), alpha=final_fraction)
  else:
    decay = optax.exponential_decay(1.0, max(int(round(decay_epochs * steps_per_epoch)), 1),
                                    decay_rate, staircase=True)
  if warmup == 0:
    return decay
  # (step + 1) / warmup: the first step already learns, the last warmup step is at full rate.
  ramp = optax.linear_schedule(1.0 / warmup, 1.0, max(warmup - 1, 1))
  return optax.join_schedules([ramp, decay], [warmup])


def peak_learning_rate(base: float, global_batch: int, scale_by_batch: bool) -> float:
  """`base` per 256 images when scaling by batch (Goyal et al. 2017)."""
  return base * global_batch / 256 if scale_by_batch else base


def make_optimizer(name: str, shape: Callable[[jax.Array], jax.Array], learning_rate: float,
                   weight_decay: float = 0.0, weight_decay_mode: str = "decoupled",
                   momentum: float = 0.9, nesterov: bool = False, rms_decay: float = 0.9,
                   eps: float | None = None, b1: float = 0.9, b2: float = 0.999,
                   trust_coefficient: float = 0.001,
                   clip_norm: float | None = None) -> optax.GradientTransformation:
  """An optax optimizer whose `learning_rate` and `weight_decay` live in its state."""
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
  if weight_decay_mode not in WEIGHT_DECAY_MODES:
    raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
  if name == "adamw" and weight_decay_mode != "decoupled":
    raise ValueError("adamw decouples weight decay by definition; set weight_decay_mode='decoupled' "
                     "or use optimizer 'adam' with coupled decay")
  decoupled = weight_decay_mode == "decoupled"

  def factory(learning_rate, weight_decay):
    def lr_scaling():
      # The step direction is negated here, once, for every optimizer.
      return [optax.scale_by_schedule(shape), optax.scale(-learning_rate)]

    def decay():
      return [optax.add_decayed_weights(weight_decay, decay_mask)] if decoupled else []

    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    if name == "sgd":
      parts += decay() + [optax.trace(momentum, nesterov)] + lr_scaling()
    elif name == "rmsprop_tf":
      parts += [optax.scale_by_rms(rms_decay, 1e-3 if eps is None else eps, initial_scale=1.0,
                                   eps_in_sqrt=True)]
      parts += decay() + lr_scaling() + [optax.trace(momentum, nesterov)]
    elif name in ("adam", "adamw"):
      parts += [optax.scale_by_adam(b1, b2, 1e-8 if eps is None else eps)] + decay() + lr_scaling()
    elif name == "lars":
      # Layer-wise trust ratios for kernels only, as LARS and LAMB are used in practice.
      parts += decay() + [optax.masked(
          optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), decay_mask)]
      parts += lr_scaling() + [optax.trace(momentum, nesterov)]
    else:  # lamb
      parts += [optax.scale_by_adam(b1, b2, 1e-6 if eps is None else eps)] + decay()
      parts += [optax.masked(optax.scale_by_trust_ratio(), decay_mask)] + lr_scaling()
    return optax.chain(*parts)

  if not (math.isfinite(learning_rate) and learning_rate > 0):
    raise ValueError(f"learning rate must be positive and finite, got {learning_rate!r}")
  if weight_decay < 0:
    raise ValueError(f"weight decay must be >= 0, got {weight_decay!r}")
  # Strongly typed float32 values, so that a trial writing new ones does not recompile.
  return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
      learning_rate=learning_rate, weight_decay=weight_decay)
