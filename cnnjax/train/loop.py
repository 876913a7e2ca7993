"""`train_and_evaluate(config, workdir)`: the training loop, resumable from its workdir.

The workdir holds `config.json` (the run's config; resuming with a different
one is refused), `checkpoints/` (the last N steps), `best/` (the best by
`config.best_metric`, when set), `metrics.jsonl` and `tensorboard/`.
Checkpoints that cannot be read are moved to `unreadable_checkpoints/`.
Starting a run in a workdir that has checkpoints resumes from the newest
readable one: state, RNG and data position come back, and because batches
and per-step keys are functions of the step, the resumed run computes exactly
what an uninterrupted one does.

A signal from a scheduler (SIGTERM, SIGINT, SIGUSR1: `config.save_on_signals`)
ends a run after its current step with a checkpoint written synchronously and
`preemption.Preempted` (exit code 75); the same command resumes it
(`cnnjax.train.preemption`). A checkpoint that cannot be written for lack of
space stops the run with `checkpoint.DiskFullError`, the previous one intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cnnjax import registry
from cnnjax import data as data_lib
from cnnjax.data import datasets as datasets_lib
from cnnjax import fileio, host_allocator
from cnnjax import lease as lease_lib
from cnnjax.models import lowering
from cnnjax.train import checkpoint as checkpoint_lib
from cnnjax.train import config as config_lib
from cnnjax.train import optim, preemption, step_cache, steps
from cnnjax.train.logs import MetricWriter

log = logging.getLogger("cnnjax.train")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Config keys that no compiled step depends on, left out of the step cache's key.
NOT_IN_STEPS = ("seed",)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


class ConfigMismatchError(ValueError):
  """The workdir belongs to a run with a different configuration."""


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` from `config.distributed` or JAX_* environment variables.

  Does nothing for a single process. Must run before JAX touches a device.
  """
  settings = config.distributed
  address = settings.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return
  if jax.distributed.is_initialized():
    return
  num_processes = settings.num_processes or int(os.environ["JAX_NUM_PROCESSES"])
  process_id = settings.process_id
  if process_id is None:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  def walk(prefix, value):
    if isinstance(value, dict):
      for key, item in value.items():
        yield from walk(f"{prefix}{key}.", item)
    else:
      yield prefix[:-1], value
  return dict(walk("", json.loads(config.to_json())))


# A run that started from a weights file may find it under another path, with the same
# contents: a moved or merged workdir (a finetune sweep keeps its pretrained weights inside)
# is still the same run. `config.json` records the digest beside the config.
INIT_DIGEST = "init_from_sha256"


def _file_digest(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _init_digest(config: ml_collections.ConfigDict) -> str | None:
  source = pathlib.Path(config.init_from).expanduser() if config.init_from else None
  return _file_digest(source) if source is not None and source.is_file() else None


def check_saved_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> bool:
  """Whether `workdir` holds a run's config; `ConfigMismatchError` where it differs from `config`.

  Keys in `RESUMABLE_CHANGES` may differ: they change how a run goes, not what it computes.
  So may `init_from`'s path, where the file there now has the contents the run started from.
  """
  path = workdir / "config.json"
  if not path.exists():
    return False
  saved = json.loads(path.read_text())
  # Under the same path the file's contents do not matter: a resumed run reads its
  # checkpoints, not the weights again.
  saved_digest = saved.pop(INIT_DIGEST, None)
  current = _flat(config)
  if (current.get("init_from") != saved.get("init_from") and saved_digest is not None
      and saved_digest == _init_digest(config)):
    current["init_from"] = saved.get("init_from")
  changed = sorted(key for key in set(saved) | set(current)
                   if saved.get(key) != current.get(key)
                   and not key.startswith(config_lib.RESUMABLE_CHANGES))
  if changed:
    details = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed[:8])
    raise ConfigMismatchError(
        f"{workdir} holds a run with a different config ({details}). Resuming it with these "
        "changes would mix two experiments; use a new --workdir, or restore the old values.")
  return True


def _check_or_write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  if not check_saved_config(config, workdir) and jax.process_index() == 0:
    identity = _flat(config)
    if (digest := _init_digest(config)) is not None:
      identity[INIT_DIGEST] = digest
    fileio.write_atomically(workdir / "config.json",
                            json.dumps(identity, indent=1, sort_keys=True))


@dataclasses.dataclass
class _Run:
  """Everything built from the config before the first step."""

  model: Any
  num_classes: int
  train_batches: data_lib.TrainBatches
  eval_batches: data_lib.EvalBatches
  image_shape: tuple
  total_steps: int
  steps_per_epoch: int
  eval_every: int
  checkpoint_every: int | None
  schedule: Any
  tx: Any
  step_config: steps.StepConfig
  num_workers: int  # grain worker processes: config.data.num_workers, or the platform's default
  # What the compiled steps are a function of besides their arguments (step_cache's key).
  step_description: dict | None = None
  # The training split held on the devices ({"image", "label"} host arrays), or None.
  resident_data: dict | None = None


def _prepare_dataset(config) -> data_lib.DatasetInfo:
  name, data_dir, backend = config.data.dataset, config.data.data_dir, config.data.backend
  if jax.process_count() == 1:
    return data_lib.prepare(name, data_dir, progress=config.progress_bar, backend=backend)
  from jax.experimental import multihost_utils  # noqa: PLC0415

  if jax.process_index() == 0:  # one writer; the others wait for the prepared data
    data_lib.prepare(name, data_dir, progress=config.progress_bar, backend=backend)
  multihost_utils.sync_global_devices("cnnjax: dataset prepared")
  return data_lib.info(name, data_dir, progress=False, backend=backend)


def _device_augment(config, preprocessing: data_lib.Preprocessing):
  """What the step does to the host's uint8 batch; None where it only normalises."""
  d = config.data
  on_device = preprocessing.host_stages != "all"
  if not on_device and not (d.mixup_alpha or d.cutmix_alpha or d.erase_prob):
    return None  # the host path as it was: the step normalises (StepConfig.normalization)
  crop = {"none": preprocessing.train_crop, "region": "region"}.get(preprocessing.host_stages,
                                                                    "none")
  return data_lib.DeviceAugment(
      image_size=preprocessing.image_size, crop=crop, crop_scale=preprocessing.crop_scale,
      pad=preprocessing.pad, flip=preprocessing.flip and on_device,
      rand_augment=preprocessing.rand_augment if on_device else None,
      mean=tuple(preprocessing.mean), std=tuple(preprocessing.std),
      mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha, mix_prob=d.mix_prob,
      switch_prob=d.switch_prob, erase_prob=d.erase_prob, erase_mode=d.erase_mode)


def device_memory_bytes(device: jax.Device | None = None) -> int | None:
  """One device's memory: what its allocator may use, or on the CPU what the host has free."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return datasets_lib.available_memory()


def _resident_split(config, source, stored_shape: tuple,
                    preprocessing: data_lib.Preprocessing) -> dict | None:
  """The training split as uint8 host arrays to put on the devices, or None (with one
  warning giving both sizes) where it is over `device_memory_share` of a device's memory."""
  channels = preprocessing.channels
  nbytes = len(source) * int(np.prod(stored_shape[:2])) * channels
  memory = device_memory_bytes()
  budget = None if memory is None else config.data.device_memory_share * memory
  if budget is not None and nbytes > budget:
    log.warning(
        "config.data.device_resident: the training split is %s (%d images of %s), over the "
        "%s that device_memory_share=%g of a device's %s allows; the host reads it instead. "
        "Raise device_memory_share, or store smaller images.",
        fileio.human_bytes(nbytes), len(source), stored_shape, fileio.human_bytes(budget),
        config.data.device_memory_share, fileio.human_bytes(memory))
    return None
  held = source if isinstance(source, data_lib.ArraySource) else datasets_lib.hold_in_memory(
      source, stored_shape, f"{config.data.dataset}[{config.data.train_split}]")
  images = held.images
  if images.shape[-1] != channels:  # what Preprocessing does per image, for the whole split
    images = np.stack([preprocessing.train(image, None) for image in images])
  return {"image": np.ascontiguousarray(images, np.uint8),
          "label": np.asarray(held.labels, np.int32)}


def build(config: ml_collections.ConfigDict) -> _Run:
  """The model, data pipelines, schedule and optimizer that `config` describes."""
  dataset = _prepare_dataset(config)
  num_classes = config.data.num_classes or dataset.num_classes
  model = registry.create_model(config.model, num_classes=num_classes,
                                dtype=DTYPES[config.dtype], **config_lib.model_overrides(config))
  info = registry.model_info(config.model)
  image_size = config.data.image_size or getattr(model, "input_size", None) or info.input_size
  channels = info.channels
  augment_on = data_lib.default_augment_on(config.data.augment_on)
  stored_shape = tuple(dataset.image_shape or (None, None, None))
  # The device crops from the stored image where the split has one size (its "canvas").
  # From images of varying size the host decodes the crop, and the device does the rest: the
  # random resized crop's resize too (the host's resize was over half its time per image,
  # BENCHMARKS.md), the CIFAR-style crops' after the host's resize.
  canvas = None not in stored_shape[:2]
  if augment_on == "host":
    host_stages = "all"
  elif canvas:
    host_stages = "none"
  else:
    host_stages = "region" if config.data.train_crop == "random_resized" else "crop"
  preprocessing = data_lib.Preprocessing(
      image_size=image_size, channels=channels,
      mean=tuple(config.data.mean or info.mean), std=tuple(config.data.std or info.std),
      interpolation=config.data.interpolation or info.interpolation,
      train_crop=config.data.train_crop, crop_scale=tuple(config.data.crop_scale),
      pad=config.data.pad, flip=config.data.flip,
      rand_augment=((config.data.rand_augment_ops, config.data.rand_augment_magnitude)
                    if config.data.rand_augment_ops else None),
      crop_fraction=config.data.crop_fraction or info.crop_fraction,
      output="uint8",  # a quarter of the bytes to the device; the step normalises
      host_stages=host_stages)
  augment = _device_augment(config, preprocessing)
  if augment is not None and host_stages == "none":
    augment.check_input(stored_shape)
  sharding = data_lib.Sharding.from_jax()
  if config.batch_size % jax.device_count():
    raise ValueError(f"config.batch_size={config.batch_size} must be divisible by the number of "
                     f"devices ({jax.device_count()})")
  eval_batch = config.eval_batch_size or config.batch_size
  if eval_batch % jax.device_count():
    raise ValueError(f"config.eval_batch_size={eval_batch} must be divisible by the number of "
                     f"devices ({jax.device_count()})")
  train_source, eval_source = (
      data_lib.data_source(config.data.dataset, split, config.data.data_dir, config.data.backend,
                           in_memory=config.data.in_memory)
      for split in (config.data.train_split, config.data.eval_split))
  resident_data = _resident_split(config, train_source, stored_shape, preprocessing) if (
      config.data.device_resident and host_stages == "none") else None
  if config.data.device_resident and host_stages != "none":
    log.warning("config.data.device_resident: %s; the host reads it",
                "augment_on is 'host'" if augment_on == "host" else
                f"{config.data.dataset}'s images have no single size ({stored_shape})")
  if resident_data is not None:
    train_batches = data_lib.ResidentBatches(len(resident_data["label"]), config.batch_size,
                                             config.seed, sharding)
  else:
    train_batches = data_lib.TrainBatches(train_source, preprocessing, config.batch_size,
                                          config.seed, sharding)
  eval_batches = data_lib.EvalBatches(eval_source, preprocessing, eval_batch, sharding)
  steps_per_epoch = train_batches.steps_per_epoch
  total_steps = config.num_steps or max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  checkpoint_every = (max(1, int(round(config.checkpoint_every_epochs * steps_per_epoch)))
                      if config.checkpoint_every_epochs else None)
  o = config.optimizer
  schedule = optim.schedule_shape(
      o.schedule, total_steps, steps_per_epoch, warmup_epochs=o.warmup_epochs,
      boundaries_epochs=tuple(o.boundaries_epochs), decay_factor=o.decay_factor,
      decay_epochs=o.decay_epochs, decay_rate=o.decay_rate, final_fraction=o.final_fraction)
  tx = optim.make_optimizer(
      o.name, schedule, optim.peak_learning_rate(o.learning_rate, config.batch_size,
                                                 o.scale_by_batch),
      weight_decay=o.weight_decay, weight_decay_mode=o.weight_decay_mode, momentum=o.momentum,
      nesterov=o.nesterov, rms_decay=o.rms_decay, eps=o.eps, b1=o.b1, b2=o.b2,
      trust_coefficient=o.trust_coefficient, clip_norm=o.clip_norm)
  trainable = None
  if config.freeze_body:
    from cnnjax import weights  # noqa: PLC0415

    heads = weights.head_paths(config.model, num_classes, **config_lib.model_overrides(config))
    trainable = tuple(sorted(path[1:] for path in heads if path[0] == "params"))
  step_config = steps.StepConfig(label_smoothing=config.label_smoothing,
                                 aux_loss_weight=config.aux_loss_weight,
                                 weight_decay_mode=o.weight_decay_mode, ema_decay=config.ema_decay,
                                 ghost_batch_norm=config.ghost_batch_norm, trainable=trainable,
                                 normalization=(preprocessing.mean, preprocessing.std),
                                 augment=augment)
  image_shape = (image_size, image_size, channels)
  # The steps close over the model, optimizer and schedule: all of them come from the
  # config and these numbers derived from the dataset. Keys that only change how the run
  # goes (where the data lives, when it stops or logs) are left out, so a resumed or
  # relocated run finds its step again; the parallelism stays, since it picks the program.
  # So is the seed: it picks the initial state and the data order, both made outside the
  # steps (whose keys come from the state), so the trials of a sweep over seeds compile once.
  how_it_runs = tuple(k for k in config_lib.RESUMABLE_CHANGES if k != "parallelism")
  step_description = {"config": {k: v for k, v in _flat(config).items()
                                 if not k.startswith(how_it_runs) and k not in NOT_IN_STEPS},
                      "num_classes": num_classes,
                      "image_shape": image_shape, "total_steps": total_steps,
                      "steps_per_epoch": steps_per_epoch}
  return _Run(model=model, num_classes=num_classes, train_batches=train_batches,
              eval_batches=eval_batches, image_shape=image_shape,
              total_steps=total_steps, steps_per_epoch=steps_per_epoch, eval_every=eval_every,
              checkpoint_every=checkpoint_every,
              schedule=schedule, tx=tx, step_config=step_config,
              # A resident split's stream is row numbers: no worker processes for that.
              num_workers=(0 if resident_data is not None
                           else data_lib.default_workers(config.data.num_workers)),
              resident_data=resident_data,
              step_description=(step_description if step_cache.is_cnnjax_model(model) else None))


class _Devices:
  """The jit (Mesh) or pmap way of placing state and batches and calling the steps."""

  def __init__(self, run: _Run, parallelism: str, fast_compile: bool = False):
    self._compiled_eval = None
    self.step_description = run.step_description
    # The initial state's program depends on what the steps do, less the seed (an argument);
    # the step cache covers one process, as for the steps.
    self.init_description = run.step_description if jax.process_count() == 1 else None
    self.mesh = steps.make_mesh()
    self.compiler_options = {**steps.compiler_options(self.mesh),
                             **(steps.FAST_COMPILE_OPTIONS if fast_compile else {})}
    # A fast compile also traces XLA's own convolutions: the CPU lowering's choices buy
    # step time with tracing and compile time (a small EfficientNet's training step took
    # 1.9 s to trace and 3.4 s to compile with them, 1.0 and 2.4 s without).
    self.lowering = (functools.partial(lowering.use, "xla") if fast_compile
                     else contextlib.nullcontext)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(steps.DATA_AXIS))
    self.pmap = parallelism == "pmap"
    self.resident = None
    if self.pmap:
      self.train, self.evaluate = steps.pmap_steps(run.model, run.tx, run.step_config)
    else:
      self.train, self.evaluate = steps.jit_steps(run.model, run.tx, run.step_config, self.mesh,
                                                  run.schedule,
                                                  resident=run.resident_data is not None)
      if run.resident_data is not None:  # once, replicated on every device
        self.resident = {k: jax.make_array_from_process_local_data(self.replicated, v)
                         for k, v in run.resident_data.items()}
    self.local_devices = jax.local_device_count()

  def batches(self, iterator, prefetch: int):
    if not self.pmap:
      yield from data_lib.prefetch_to_device(iterator, self.batch_sharding, prefetch)
      return
    get_state = getattr(iterator, "get_state", lambda: None)
    for batch in iterator:
      split = {k: v.reshape((self.local_devices, -1) + v.shape[1:])
               for k, v in batch.items() if k in ("image", "label", "mask", "region")}
      yield split, get_state()

  def replicated_from_host(self, tree):
    """Host arrays (the same in every process) as replicated global arrays."""
    return jax.tree.map(lambda x: self._replicate(np.asarray(x)), tree)

  def to_steps(self, state):
    """The canonical (replicated global) state in the form the steps take."""
    if not self.pmap:
      return state
    per_device = NamedSharding(steps.make_mesh(jax.local_devices()), P(steps.DATA_AXIS))
    return jax.device_put(jax.tree.map(lambda x: jnp.broadcast_to(
        x.addressable_data(0), (self.local_devices,) + x.shape), state), per_device)

  def from_steps(self, state):
    """The steps' state back in canonical form (for checkpoints)."""
    if not self.pmap:
      return state
    return jax.tree.map(lambda x: self._replicate(x[0]), state)

  def _replicate(self, local):
    if jax.dtypes.issubdtype(local.dtype, jax.dtypes.prng_key):
      data = self._replicate(jax.random.key_data(local))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(local))
    return jax.make_array_from_process_local_data(self.replicated, np.asarray(local))

  def scalars(self, metrics) -> dict[str, float]:
    metrics = jax.device_get(metrics)
    if self.pmap:
      metrics = jax.tree.map(lambda x: x[0], metrics)
    return {k: float(v) for k, v in metrics.items()}

  def compile(self, state, batch):
    """AOT-compiles the train step for these shapes; (compiled, seconds, loaded from disk)."""
    start = time.perf_counter()
    if self.resident is None:
      compiled, loaded = self._compile("train", self.train, state, batch)
    else:
      step, loaded = self._compile("train", self.train, state, batch, self.resident)
      compiled = lambda state, batch: step(state, batch, self.resident)  # noqa: E731
    return compiled, time.perf_counter() - start, loaded

  def _compile(self, name: str, step, *args):
    with self.lowering():  # tracing happens here, so the lowering mode applies here
      # The step cache covers one process: executables of a multi-process run are untested.
      if self.pmap or self.step_description is None or jax.process_count() > 1:
        return step.lower(*args).compile(compiler_options=self.compiler_options), False
      compiled, loaded = step_cache.load_or_compile(
          step, args, description={"step": name, **self.step_description},
          compiler_options=self.compiler_options)
    if loaded:
      log.info("%s step loaded from the step cache", name)
    return compiled, loaded

  def eval_step(self, state, batch):
    if self._compiled_eval is None:
      self._compiled_eval, _ = self._compile("eval", self.evaluate, state, batch)
    return self._compiled_eval(state, batch)


def _evaluate(devices: _Devices, state, run: _Run, config) -> dict[str, float]:
  iterator = data_lib.eval_iterator(run.eval_batches, run.num_workers,
                                    config.data.num_threads, config.data.prefetch)
  totals = None
  for batch, _ in devices.batches(iterator, config.data.prefetch):
    sums = devices.eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = devices.scalars(totals)
  count = totals["count"]
  return {"loss": totals["loss"] / count, "top1": totals["top1"] / count,
          "top5": totals["top5"] / count, "count": count}


def _check_finite(window: list[tuple[int, dict]], devices: _Devices) -> dict[str, float]:
  """The mean of a window of per-step metrics; raises at the first non-finite loss."""
  values = [(step, devices.scalars(m)) for step, m in window]
  for step, metrics in values:
    if not math.isfinite(metrics["loss"]):
      raise NonFiniteLossError(
          f"the training loss is {metrics['loss']} at step {step} (counting from 1). The run "
          "stopped; the last checkpoint before it is kept. Lower the learning rate, add warmup or "
          "gradient clipping (config.optimizer.clip_norm), or train in float32.")
  keys = values[-1][1].keys()
  mean = {k: float(np.mean([m[k] for _, m in values])) for k in keys}
  mean["learning_rate"] = values[-1][1]["learning_rate"]
  return mean


@jax.jit
def _all_finite(tree) -> jax.Array:
  # One reduction over the leaves joined, which XLA fuses into it rather than copying: a
  # reduction per leaf took 8x as long to compile (1.1 against 0.14 s for the 96 leaves of a
  # small EfficientNet), paid again for every model a process trains.
  return jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])).all()


def _wait_for_writes(*checkpoints) -> None:
  """Waits for pending writes on the way out (a timed-out commit is reported, not raised)."""
  for checkpoint in checkpoints:
    if checkpoint is not None:
      checkpoint.finish()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains `config.model` on `config.data.dataset`; returns the final evaluation metrics.

  Resumes from `workdir` when it holds checkpoints of the same config. The run
  holds the workdir's lease (`cnnjax.lease`, process 0 of a multi-process run)
  from before its first write: a second run on the same workdir is refused
  with `WorkdirBusyError` and touches nothing.

  Returns the last evaluation's metrics (`top1`, `top5`, `loss`, `count`) with `step`,
  `total_steps`, `devices`, `train_loss`, `train_accuracy`, `compile_seconds`,
  `train_seconds` and `images_per_second`. Raises `ValueError` for a bad config value
  (naming the key), `ConfigMismatchError` where the workdir holds another config's run,
  `NonFiniteLossError` at a NaN or infinite loss, `DatasetError` for data that is not
  prepared, `checkpoint.DiskFullError` when a checkpoint does not fit, and
  `preemption.Preempted` (a `SystemExit`, code 75) after a scheduler's signal.
  """
  config_lib.validate(config)
  host_allocator.warn_if_too_late()
  initialize_distributed(config)
  workdir = pathlib.Path(workdir).expanduser().absolute()
  with preemption.watch(config.save_on_signals):
    if jax.process_index() != 0:
      return _train_and_evaluate(config, workdir, None)
    with lease_lib.hold(workdir) as held:
      return _train_and_evaluate(config, workdir, held)


def evaluate_checkpoint(workdir: str | os.PathLike, which: str = "best",
                        config: ml_collections.ConfigDict | None = None) -> dict:
  """Evaluates a finished or running run's checkpoint on its test split; reads nothing else.

  `which` is "best" (kept with `config.best_metric`) or "latest". The config is
  the run's own `config.json` unless given. Returns {"step", "loss", "top1", "top5", "count"}.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  if which not in ("best", "latest"):
    raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
  if config is None:
    path = workdir / "config.json"
    if not path.exists():
      raise FileNotFoundError(f"{workdir} holds no run (no config.json); pass config=")
    saved = json.loads(path.read_text())
    saved.pop(INIT_DIGEST, None)
    config = config_lib.with_overrides(config_lib.default_config(), saved)
  directory = workdir / ("best" if which == "best" else "checkpoints")
  if not directory.exists():
    hint = " (the run kept none: set config.best_metric)" if which == "best" else ""
    raise FileNotFoundError(f"no {which} checkpoint in {workdir}{hint}")
  run = build(config)
  devices = _Devices(run, config.parallelism, config.fast_compile)
  state = steps.init_state(run.model, run.tx, run.image_shape, config.seed,
                           ema=config.ema_decay > 0, sharding=devices.replicated,
                           description=devices.init_description)
  manager = checkpoint_lib.make_manager(directory, 1, async_save=False)
  restored = checkpoint_lib.restore_latest(manager, checkpoint_lib.abstract_like(state))
  if restored is None:
    raise FileNotFoundError(f"no {which} checkpoint in {directory}")
  step, state, _ = restored
  metrics = _evaluate(devices, devices.to_steps(state), run, config)
  return {"step": step, **metrics}


def _start_from_weights(state: steps.TrainState, run: _Run, config, devices: _Devices):
  """`state` with the pretrained variables of `config.init_from` (and a fresh optimizer state)."""
  from cnnjax import weights  # noqa: PLC0415

  variables = weights.load_weights(config.model, config.init_from, num_classes=run.num_classes,
                                   seed=config.seed, **config_lib.model_overrides(config))
  variables = devices.replicated_from_host(
      {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})
  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = jax.jit(run.tx.init, out_shardings=devices.replicated)(params)
  ema = state.ema_params is not None
  log.info("initialised from %s", config.init_from)
  return state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state,
                       ema_params=params if ema else None,
                       ema_batch_stats=batch_stats if ema else None)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        held: lease_lib.Lease | None) -> dict:
  _check_or_write_config(config, workdir)
  run = build(config)
  devices = _Devices(run, config.parallelism, config.fast_compile)

  loss_scale = config.initial_loss_scale if config.dtype == "float16" else None
  state = steps.init_state(run.model, run.tx, run.image_shape, config.seed,
                           ema=config.ema_decay > 0, loss_scale=loss_scale,
                           sharding=devices.replicated, description=devices.init_description)
  def manager(name: str, keep: int):
    return checkpoint_lib.Checkpoints(checkpoint_lib.make_manager(
        workdir / name, keep, async_save=config.async_checkpoint,
        commit_timeout_seconds=config.checkpoint_timeout_seconds))

  latest = manager("checkpoints", config.keep_checkpoints)
  best = manager("best", 1) if config.best_metric else None
  workers = run.num_workers
  restored = checkpoint_lib.restore_latest(latest.manager, checkpoint_lib.abstract_like(state),
                                           quarantine=workdir / "unreadable_checkpoints")
  data_state, best_value = None, None
  # Seconds earlier processes spent reaching the restored checkpoint: a resumed run reports
  # the time its whole result took, not only its last part.
  seconds_before = 0.0
  if restored is not None:
    step, state, extra = restored
    data_state, best_value = extra.get("data_state"), extra.get("best_value")
    seconds_before = float(extra.get("train_seconds", 0.0))
    if extra.get("data_workers", extra.get("config", {}).get("data.num_workers")) != workers:
      data_state = None  # grain's state has another form with other workers: resume by step
    log.info("resumed from step %d in %s", step, workdir)
  elif config.init_from:
    state = _start_from_weights(state, run, config, devices)
  start_step = int(jax.device_get(state.step))

  writer = MetricWriter(workdir, run.total_steps, config.batch_size, start_step,
                        tensorboard=config.tensorboard, progress_bar=config.progress_bar)
  if data_state is not None:
    iterator = data_lib.train_iterator(run.train_batches, run.total_steps,
                                       workers, config.data.num_threads,
                                       config.data.prefetch)
    iterator.set_state(data_state)
  else:
    iterator = data_lib.train_iterator(run.train_batches, run.total_steps,
                                       workers, config.data.num_threads,
                                       config.data.prefetch, start_step=start_step)
  stop_at = min(run.total_steps, config.stop_after_steps or run.total_steps)
  step_state = devices.to_steps(state)
  train_step, compile_seconds = None, 0.0
  window: list[tuple[int, dict]] = []
  train_metrics: dict = {}
  eval_metrics: dict = {}
  start_time = time.perf_counter()
  images_seen = 0
  stepping_seconds = 0.0  # time in training steps: no compile, evaluation or checkpoints
  stepping_since = None

  def save(step: int, metrics: dict | None, wait: bool = False) -> None:
    nonlocal best_value, saved_step
    if held is not None:
      held.check()  # another process took the workdir over: write nothing more
    canonical = devices.from_steps(step_state)
    if not bool(_all_finite(canonical.params)):
      raise NonFiniteLossError(
          f"the parameters became non-finite at step {step}; the run stopped without saving "
          "them, the last checkpoint before it is kept. Lower the learning rate, add warmup or "
          "gradient clipping (config.optimizer.clip_norm), or train in float32.")
    extra = {"step": step, "data_state": current_data_state, "config": _flat(config),
             "data_workers": workers,
             "train_seconds": seconds_before + time.perf_counter() - start_time}
    if best is not None and metrics and config.best_metric in metrics:
      value = metrics[config.best_metric]
      lower_is_better = config.best_metric == "loss"
      if best_value is None or (value < best_value if lower_is_better else value > best_value):
        best_value = value
        best.save(step, canonical, {**extra, "best_value": best_value}, metrics, wait=wait)
    if not latest.save(step, canonical, {**extra, "best_value": best_value}, wait=wait):
      # An earlier save did not commit (a suspended process); this one stands in for it.
      log.warning("checkpoint of step %d written in place of the one that timed out", step)
    saved_step = step

  current_data_state = data_state
  saved_step = None
  try:
    step = start_step
    if step < stop_at:
      batches = devices.batches(iterator, config.data.prefetch)
      for batch, current_data_state in batches:
        if train_step is None:
          train_step, compile_seconds, loaded = devices.compile(step_state, batch)
          writer.write(step, "compile", {"train_step_seconds": compile_seconds,
                                         "from_step_cache": loaded})
          writer.reset_timer(step)
          stepping_since = time.perf_counter()
        step_state, metrics = train_step(step_state, batch)
        step += 1
        images_seen += config.batch_size
        window.append((step, metrics))
        boundary = step % run.eval_every == 0 or step == stop_at
        if step % config.log_every_steps == 0 or boundary:
          train_metrics = writer.train_progress(step, _check_finite(window, devices))
          writer.write(step, "train", train_metrics)
          window = []
        if boundary:
          # _check_finite fetched this step's metrics: the step has finished.
          stepping_seconds += time.perf_counter() - stepping_since
          eval_metrics = _evaluate(devices, step_state, run, config)
          writer.write(step, "eval", eval_metrics)
          save(step, eval_metrics)
          writer.reset_timer(step)
          stepping_since = time.perf_counter()
        elif run.checkpoint_every and step % run.checkpoint_every == 0:
          stepping_seconds += time.perf_counter() - stepping_since
          save(step, None)
          writer.reset_timer(step)
          stepping_since = time.perf_counter()
        if step < stop_at and preemption.should_save(step):
          if saved_step != step or not latest.finish():
            save(step, None, wait=True)
          writer.event("preempted", step, signal=preemption.requested())
          raise preemption.stop(step)
        if step >= stop_at:
          break
    if not eval_metrics:  # nothing left to train: evaluate what the workdir holds
      eval_metrics = _evaluate(devices, step_state, run, config)
      writer.write(step, "eval", eval_metrics)
    if not latest.finish() and saved_step is not None:
      save(saved_step, None, wait=True)  # the last commit timed out: the state is still here
  finally:
    _wait_for_writes(latest, best)
    writer.close()
  train_seconds = seconds_before + time.perf_counter() - start_time
  result = {"step": step, "total_steps": run.total_steps, "devices": jax.device_count(),
            **eval_metrics,
            "train_loss": train_metrics.get("data_loss", float("nan")),
            "train_accuracy": train_metrics.get("accuracy", float("nan")),
            "compile_seconds": compile_seconds, "train_seconds": train_seconds,
            "images_per_second": (images_seen / stepping_seconds if images_seen and stepping_seconds
                                  else float("nan"))}
  return result
