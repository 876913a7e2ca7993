"""The train state and the compiled train/eval steps.

One `jax.jit` step over a `Mesh` with a `data` axis: the batch is sharded along
it, the state replicated and donated. BatchNorm statistics are those of the
global batch (XLA reduces across devices). The `pmap` twin computes the same
numbers with explicit `pmean`s. Per-step randomness is `fold_in(key, step)`,
so a restarted run draws the same dropout masks as an uninterrupted one.

Ghost BatchNorm (`StepConfig.ghost_batch_norm`): each device normalises with
the statistics of its own part of the batch; the running statistics are then
averaged across devices so the state stays replicated. Under jit this runs the
step in `shard_map`; under pmap it drops the norm's axis name.

Float16 training carries a `flax.training.dynamic_scale.DynamicScale` in the
state: the loss is scaled up, gradients scaled back, and a step whose
gradients are not finite is skipped while the scale backs off.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import dynamic_scale as dynamic_scale_lib
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cnnjax.models import lowering, tuning
from cnnjax.train import optim, step_cache

if TYPE_CHECKING:  # at run time only where augmentation is on: cnnjax.data needs grain
  from cnnjax.data import device_augment

DATA_AXIS = "data"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: optax.OptState
  rng: jax.Array
  ema_params: Any = None
  ema_batch_stats: Any = None
  dynamic_scale: dynamic_scale_lib.DynamicScale | None = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  label_smoothing: float = 0.0
  aux_loss_weight: float = 0.3
  weight_decay_mode: str = "decoupled"
  ema_decay: float = 0.0
  ghost_batch_norm: bool = False
  # The parameter paths that train, when only some do (config.freeze_body); the others stay
  # as they are and their part of the network runs in inference mode.
  trainable: tuple[tuple[str, ...], ...] | None = None
  # (mean, std) per channel, on the 0..1 scale: uint8 batches are normalised in the step.
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
  # Augmentation in the step (crop, flip, RandAugment, normalisation, random erasing, mixup,
  # cutmix: `cnnjax.data.device_augment`); it replaces `normalization` when set.
  augment: device_augment.DeviceAugment | None = None


# fold_in tag of the augmentation's key: apart from the dropout key, which is the step's own.
AUGMENT_STREAM = 0x61756701


def normalize(images: jax.Array, normalization) -> jax.Array:
  """uint8 images as the host pipeline would have normalised them: (x / 255 - mean) / std in
  float32. Other dtypes (already normalised on the host) pass through."""
  if normalization is None or images.dtype != jnp.uint8:
    return images
  mean, std = (jnp.asarray(v, jnp.float32)[: images.shape[-1]] for v in normalization)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def _trainable_only(tree, trainable):
  """`tree` (params-shaped) with zeros outside `trainable`: XLA then drops their gradients."""
  if trainable is None:
    return tree
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if tuple(k.key for k in path) in trainable else jnp.zeros_like(x), tree)


def create_state(model: nn.Module, tx: optax.GradientTransformation, image_shape, seed: int,
                 ema: bool = False, loss_scale: float | None = None) -> TrainState:
  """Initialises parameters and optimizer state (call under jit to place them).

  `loss_scale` (for float16) is the initial dynamic loss scale; None disables it.
  """
  key_data = jax.random.key_data(jax.random.key(seed))
  return _state_from_key_data(model, tx, tuple(image_shape), ema, loss_scale, key_data)


def _state_from_key_data(model, tx, image_shape, ema, loss_scale, key_data) -> TrainState:
  init_key, train_key = jax.random.split(jax.random.wrap_key_data(key_data))
  variables = model.init({"params": init_key, "dropout": init_key},
                         jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), rng=train_key,
      ema_params=params if ema else None, ema_batch_stats=batch_stats if ema else None,
      dynamic_scale=(dynamic_scale_lib.DynamicScale(scale=jnp.float32(loss_scale))
                     if loss_scale else None))


# XLA optimisation level 0: the same values up to float rounding (a small EfficientNet's
# initial parameters differed in the last bit, at most 1.6e-7 relative), compiled several
# times faster and run slower.
# For what runs once or little (initialisation: 11 s against 3 s for a MobileNet v2),
# smoke runs, debugging and compile-bound tests.
FAST_COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def init_state(model: nn.Module, tx: optax.GradientTransformation, image_shape, seed: int,
               ema: bool = False, loss_scale: float | None = None,
               sharding: NamedSharding | None = None,
               description: dict | None = None) -> TrainState:
  """`create_state` compiled cheaply, placed with `sharding` (default: the default device).

  The seed's key is an argument of the program, not a constant in it, so one compiled
  initialisation serves every seed (a small EfficientNet's took 3.0 s to compile, at XLA's
  level 0: a kernel or more per parameter). With `description`, what the state depends on besides
  the key (the run's `step_cache` description), the program comes from the step cache, so a
  resumed run or a sweep's next trial neither traces nor compiles it again.
  """
  placement = {} if sharding is None else {"in_shardings": sharding, "out_shardings": sharding}
  init = jax.jit(functools.partial(_state_from_key_data, model, tx, tuple(image_shape), ema,
                                   loss_scale), **placement)
  # Host data, the same in every process: it enters a multi-process program as it is.
  key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
  # Runs once: the CPU lowering's heuristics, no per-shape measurement (tuning) for it.
  with tuning.use("off"):
    if description is None:
      compiled = init.lower(key_data).compile(compiler_options=FAST_COMPILE_OPTIONS)
    else:
      compiled, _ = step_cache.load_or_compile(
          init, (key_data,), compiler_options=FAST_COMPILE_OPTIONS,
          description={"step": "init", "sharding": repr(sharding), **description})
  return compiled(key_data)


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy against smoothed one-hot targets."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
  # bfloat16 and float16 logits are upcast; float64 ones (parity checks) stay float64.
  return optax.softmax_cross_entropy(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                                     targets)


def _split_outputs(outputs):
  if isinstance(outputs, tuple):
    return outputs[0], outputs[1:]
  return outputs, ()


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               config: StepConfig, schedule: Callable | None = None,
               axis_name: str | None = None) -> tuple[TrainState, dict]:
  """One update. With `axis_name` (pmap) gradients and metrics are averaged across it."""
  rng = jax.random.fold_in(state.rng, state.step)
  labels, mixing = batch["label"], None
  if config.augment is not None:
    from cnnjax.data import device_augment  # noqa: PLC0415

    augment_key = jax.random.fold_in(rng, AUGMENT_STREAM)
    if axis_name is not None:  # pmap: each device augments its own examples
      augment_key = jax.random.fold_in(augment_key, jax.lax.axis_index(axis_name))
    images, mixing = device_augment.augment_batch(augment_key, batch["image"], config.augment,
                                                  regions=batch.get("region"))
  else:
    images = normalize(batch["image"], config.normalization)

  def data_loss_of(logits):
    loss = cross_entropy(logits, labels, logits.shape[-1], config.label_smoothing).mean()
    if mixing is None:
      return loss
    # timm's mixed targets, lam * y + (1 - lam) * y[::-1], both smoothed: cross-entropy is
    # linear in the targets, so the loss mixes the same way.
    mixed = cross_entropy(logits, labels[::-1], logits.shape[-1], config.label_smoothing).mean()
    return mixing.lam * loss + (1.0 - mixing.lam) * mixed
  weight_decay = state.opt_state.hyperparams["weight_decay"]

  # A frozen body runs in inference mode: its BatchNorm statistics stay as loaded.
  training = config.trainable is None

  def loss_fn(params):
    outputs, mutated = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                   train=training, mutable=["batch_stats"], rngs={"dropout": rng})
    logits, aux = _split_outputs(outputs)
    data_loss = data_loss_of(logits)
    loss = data_loss
    for aux_logits in aux:
      loss += config.aux_loss_weight * data_loss_of(aux_logits)
    if config.weight_decay_mode == "coupled":
      loss += optim.l2_penalty(params, weight_decay)
    return loss, (logits, mutated.get("batch_stats", state.batch_stats), data_loss)

  dynamic_scale, finite = state.dynamic_scale, None
  if dynamic_scale is not None:
    # Averages the (unscaled) gradients across `axis_name` itself.
    dynamic_scale, finite, (loss, (logits, batch_stats, data_loss)), grads = (
        dynamic_scale.value_and_grad(loss_fn, has_aux=True, axis_name=axis_name)(state.params))
  else:
    (loss, (logits, batch_stats, data_loss)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
  if axis_name is not None and config.ghost_batch_norm:
    batch_stats = jax.lax.pmean(batch_stats, axis_name)
  grads = _trainable_only(grads, config.trainable)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # Decoupled weight decay would still move frozen weights: their updates are zeroed too.
  updates = _trainable_only(updates, config.trainable)
  params = optax.apply_updates(state.params, updates)
  if finite is not None:  # a float16 overflow: keep the old values, the scale has backed off
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
    batch_stats = keep(batch_stats, state.batch_stats)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, dynamic_scale=dynamic_scale)
  if state.ema_params is not None:
    decay = config.ema_decay
    new_state = new_state.replace(
        ema_params=optax.incremental_update(params, state.ema_params, 1.0 - decay),
        ema_batch_stats=optax.incremental_update(batch_stats, state.ema_batch_stats, 1.0 - decay))
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
  learning_rate = opt_state.hyperparams["learning_rate"]
  if schedule is not None:
    learning_rate = learning_rate * schedule(state.step)
  metrics = {"loss": loss, "data_loss": data_loss, "accuracy": accuracy,
             "learning_rate": learning_rate}
  if dynamic_scale is not None:
    metrics["loss_scale"] = dynamic_scale.scale
    metrics["skipped"] = 1.0 - finite.astype(jnp.float32)
  if axis_name is not None:
    metrics = jax.lax.pmean(metrics, axis_name)
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, use_ema: bool = False,
              axis_name: str | None = None, normalization=None) -> dict:
  """Sums over the real examples of a padded batch (`mask` is 0 on padding)."""
  params = state.ema_params if use_ema else state.params
  batch_stats = state.ema_batch_stats if use_ema else state.batch_stats
  logits = model.apply({"params": params, "batch_stats": batch_stats},
                       normalize(batch["image"], normalization), train=False)
  labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
  loss = cross_entropy(logits, labels, logits.shape[-1])
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  sums = {
      "loss": jnp.sum(loss * mask),
      "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
      "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
      "count": jnp.sum(mask),
  }
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def resident_train_step(state: TrainState, batch: dict, dataset: dict, **kwargs):
  """`train_step` on the rows `batch["rows"]` of a split held on the devices (`dataset`:
  {"image": uint8 NHWC, "label": int32 N}), gathered in the step."""
  rows = batch["rows"]
  return train_step(state, {"image": dataset["image"][rows], "label": dataset["label"][rows]},
                    **kwargs)


def jit_steps(model: nn.Module, tx: optax.GradientTransformation, config: StepConfig,
              mesh: Mesh, schedule: Callable | None = None,
              xla_options: dict | None = None,
              resident: bool = False) -> tuple[Callable, Callable]:
  """Train and eval steps compiled once for `mesh`: batch sharded, state replicated, donated.

  They compile with `xla_options`, by default `compiler_options(mesh)`. With `resident` the
  train step is `resident_train_step`, its third argument the split, replicated.
  """
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(DATA_AXIS))
  if resident:
    if config.ghost_batch_norm:
      raise ValueError("config.data.device_resident does not combine with ghost_batch_norm")
    step = functools.partial(resident_train_step, model=model, tx=tx, config=config,
                             schedule=schedule)
    options = compiler_options(mesh) if xla_options is None else xla_options
    train = jax.jit(step, in_shardings=(replicated, sharded, replicated),
                    out_shardings=(replicated, replicated), donate_argnums=0,
                    compiler_options=options)
    evaluate = jax.jit(functools.partial(eval_step, model=model, use_ema=config.ema_decay > 0,
                                         normalization=_eval_normalization(config)),
                       in_shardings=(replicated, sharded), out_shardings=replicated,
                       compiler_options=options)
    return train, evaluate
  step = functools.partial(train_step, model=model, tx=tx, config=config, schedule=schedule)
  if config.ghost_batch_norm:
    # Per-device statistics need per-device code: the step runs once per shard, with
    # explicit means over the axis (the state is replicated by construction, hence no
    # varying-manual-axes check).
    step = jax.shard_map(functools.partial(step, axis_name=DATA_AXIS), mesh=mesh,
                         in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()), check_vma=False)
  options = compiler_options(mesh) if xla_options is None else xla_options
  train = jax.jit(step, in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
                  donate_argnums=0, compiler_options=options)
  evaluate = jax.jit(functools.partial(eval_step, model=model, use_ema=config.ema_decay > 0,
                                       normalization=_eval_normalization(config)),
                     in_shardings=(replicated, sharded), out_shardings=replicated,
                     compiler_options=options)
  return train, evaluate


def _eval_normalization(config: StepConfig):
  """Evaluation's normalisation: the training augmentation's mean and std where it has them."""
  if config.augment is not None:
    return (tuple(config.augment.mean), tuple(config.augment.std))
  return config.normalization


def compiler_options(mesh: Mesh) -> dict:
  """The XLA options cnnjax's steps compile with on `mesh`'s platform (see `lowering`)."""
  return lowering.compiler_options(mesh.devices.flat[0].platform)


def with_norm_axis(model: nn.Module, axis_name: str) -> nn.Module:
  """The same model with BatchNorm statistics averaged across `axis_name` (for pmap)."""
  norm = getattr(model, "norm", None)
  if norm is None:
    return model
  return model.clone(norm=functools.partial(norm, axis_name=axis_name))


def pmap_steps(model: nn.Module, tx: optax.GradientTransformation,
               config: StepConfig) -> tuple[Callable, Callable]:
  """The pmap twin of `jit_steps` (state replicated per device, batch split by device)."""
  if not config.ghost_batch_norm:
    model = with_norm_axis(model, DATA_AXIS)
  train = jax.pmap(functools.partial(train_step, model=model, tx=tx, config=config,
                                     axis_name=DATA_AXIS), axis_name=DATA_AXIS, donate_argnums=0)
  evaluate = jax.pmap(functools.partial(eval_step, model=model, use_ema=config.ema_decay > 0,
                                        axis_name=DATA_AXIS,
                                        normalization=_eval_normalization(config)),
                      axis_name=DATA_AXIS)
  return train, evaluate
