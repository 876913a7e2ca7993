"""The training configuration: every knob of `train_and_evaluate`, with defaults.

`default_config()` returns a locked `ml_collections.ConfigDict`, so a typo in a
key is an error that names it. Experiment configs start from it and override.
Fields left `None` take the value from the model's or the dataset's info
(`image_size`, `num_classes`, `crop_fraction`, `interpolation`, `mean`/`std`).
"""

from __future__ import annotations

import copy

import ml_collections
from ml_collections import config_dict

DTYPES = ("float32", "bfloat16", "float16")
PARALLELISMS = ("jit", "pmap")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = "resnet20"
  # Constructor fields of the model (e.g. widths=(8, 16, 32)); any the module has.
  c.model_overrides = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "digits"
  c.data.data_dir = config_dict.placeholder(str)
  c.data.backend = "grain"  # grain (array_record, no TensorFlow) | tf (tfds.load, needs TF)
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.num_classes = config_dict.placeholder(int)
  c.data.image_size = config_dict.placeholder(int)
  c.data.train_crop = "random_resized"  # random_resized | pad_crop | resize
  c.data.crop_scale = (0.08, 1.0)
  c.data.pad = 4
  c.data.flip = True
  c.data.rand_augment_ops = 0  # RandAugment N; 0 disables it
  c.data.rand_augment_magnitude = 9.0  # M on the 0..30 scale
  c.data.crop_fraction = config_dict.placeholder(float)
  c.data.interpolation = config_dict.placeholder(str)
  c.data.mean = config_dict.placeholder(tuple)
  c.data.std = config_dict.placeholder(tuple)
  # Where crop, flip and RandAugment run: "host" (grain, PIL) or "device" (in the jitted step,
  # cnnjax.data.device_augment). None: per platform (`cnnjax.data.default_augment_on`): the
  # device on GPU and TPU, where the host's pipeline bounds training; the host on the CPU,
  # where the step's cores are the same cores (BENCHMARKS.md, device augmentation).
  c.data.augment_on = config_dict.placeholder(str)
  # The training split put on the devices once as uint8 (it must have one image size); each
  # step gathers its rows there, and the host does nothing per step. Needs augment_on
  # "device" (or None on an accelerator). A split over device_memory_share of one device's
  # memory stays on the host, with a warning.
  c.data.device_resident = False
  c.data.device_memory_share = 0.25
  # timm's mixup and cutmix (0 = off; 0.8 and 1.0 in DeiT's recipe): one mixing per batch with
  # the batch reversed, with probability mix_prob; switch_prob picks cutmix when both are on.
  # Label smoothing (config.label_smoothing) applies to both targets. Run in the step.
  c.data.mixup_alpha = 0.0
  c.data.cutmix_alpha = 0.0
  c.data.mix_prob = 1.0
  c.data.switch_prob = 0.5
  # timm's random erasing after normalisation: probability per image; fill "pixel" (noise),
  # "rand" (one noise colour) or "const" (zeros). Run in the step.
  c.data.erase_prob = 0.0
  c.data.erase_mode = "pixel"
  # Decode the splits once and hold them (fixed-size images that fit in memory): decoding
  # a PNG per image and epoch is half the pipeline's time on small images.
  c.data.in_memory = False
  # grain worker processes; 0 reads in the training process. None: decided per platform
  # (`cnnjax.data.default_workers`): on an accelerator one per CPU core the process may use,
  # since the host's input pipeline, not the step, bounds it there; on the CPU 0, since the
  # step itself needs those cores.
  c.data.num_workers = config_dict.placeholder(int)
  c.data.num_threads = 1
  c.data.prefetch = 2

  c.batch_size = 128  # global, over all devices of all processes
  c.eval_batch_size = config_dict.placeholder(int)  # defaults to batch_size
  c.num_epochs = 10.0
  c.num_steps = config_dict.placeholder(int)  # overrides num_epochs when set

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1  # the peak rate (per 256 images with scale_by_batch)
  c.optimizer.scale_by_batch = False
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.rms_decay = 0.9
  c.optimizer.eps = config_dict.placeholder(float)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.trust_coefficient = 0.001
  c.optimizer.weight_decay = 5e-4
  c.optimizer.weight_decay_mode = "coupled"  # coupled (L2 in the loss) | decoupled
  c.optimizer.clip_norm = config_dict.placeholder(float)
  c.optimizer.schedule = "cosine"  # constant | multistep | cosine | exponential
  c.optimizer.warmup_epochs = 0.0
  c.optimizer.boundaries_epochs = ()
  c.optimizer.decay_factor = 0.1
  c.optimizer.decay_epochs = 2.4
  c.optimizer.decay_rate = 0.97
  c.optimizer.final_fraction = 0.0

  # Fine-tuning: start from pretrained weights instead of a random init (any source
  # cnnjax.load_weights reads: .safetensors, .pth, .npz in torchvision's or timm's names).
  # A classifier for another number of classes is initialised afresh. On resume the
  # run's own checkpoints win.
  c.init_from = config_dict.placeholder(str)
  # With init_from: train the classifier only. The body keeps its loaded weights and runs
  # in inference mode (BatchNorm with the loaded statistics, no dropout).
  c.freeze_body = False

  c.label_smoothing = 0.0
  c.aux_loss_weight = 0.3
  c.ema_decay = 0.0  # > 0 keeps an EMA of weights and BN statistics and evaluates it

  c.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16 (params stay float32)
  c.initial_loss_scale = 2.0 ** 15  # float16 only
  c.parallelism = "jit"  # jit (Mesh + NamedSharding) | pmap
  c.ghost_batch_norm = False  # per-device BatchNorm statistics
  c.fast_compile = False  # XLA optimisation level 0: faster compiles, slower steps (smoke runs)

  c.eval_every_epochs = 1.0
  c.log_every_steps = 20
  # Checkpoints are written at every evaluation and, when set, this often between them: a long
  # trial that evaluates once at its end still loses little when its process is killed.
  c.checkpoint_every_epochs = config_dict.placeholder(float)
  c.keep_checkpoints = 2
  c.best_metric = config_dict.placeholder(str)  # e.g. "top1": also keep the best checkpoint
  c.async_checkpoint = True
  # Orbax's limit on an asynchronous commit (None: its 1,200 s). It counts wall-clock time, so a
  # process suspended mid-commit exceeds it; the run then writes that checkpoint again
  # (cnnjax.train.checkpoint.Checkpoints).
  c.checkpoint_timeout_seconds = config_dict.placeholder(int)
  # These signals make a run finish its step, save, and exit with code 75 for a requeue
  # (cnnjax.train.preemption); () leaves them to their usual handlers.
  c.save_on_signals = ("SIGTERM", "SIGINT", "SIGUSR1")
  c.progress_bar = True
  c.tensorboard = True
  c.stop_after_steps = config_dict.placeholder(int)  # end this invocation early (resumable)

  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = config_dict.placeholder(str)
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)

  c.lock()
  # Free-form: the model's own fields, checked (with suggestions) by `create_model`.
  c.model_overrides.unlock()
  return c


# Keys that may differ when a run resumes: they change how it runs, not what it computes.
RESUMABLE_CHANGES = ("data.data_dir", "data.in_memory", "data.device_resident",
                     "data.device_memory_share", "data.num_workers", "data.num_threads",
                     "data.prefetch", "log_every_steps", "progress_bar", "tensorboard",
                     "async_checkpoint", "stop_after_steps", "distributed", "parallelism",
                     "checkpoint_every_epochs", "checkpoint_timeout_seconds", "save_on_signals")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that the types alone do not; names the key and the fix."""
  def choice(key, value, options):
    if value not in options:
      raise ValueError(f"config.{key} must be one of {options}, got {value!r}")

  choice("dtype", config.dtype, DTYPES)
  choice("parallelism", config.parallelism, PARALLELISMS)
  if config.batch_size < 1:
    raise ValueError(f"config.batch_size must be positive, got {config.batch_size}")
  if config.num_steps is None and not config.num_epochs > 0:
    raise ValueError(f"config.num_epochs must be positive, got {config.num_epochs}")
  for key in ("eval_every_epochs", "checkpoint_every_epochs"):
    value = config[key]
    if value is not None and not value > 0:
      raise ValueError(f"config.{key} must be positive (in epochs; 0.5 is every half epoch), "
                       f"got {value}")
  if config.checkpoint_timeout_seconds is not None and not config.checkpoint_timeout_seconds > 0:
    raise ValueError(f"config.checkpoint_timeout_seconds must be a positive number of seconds "
                     f"(or None for Orbax's 1,200), got {config.checkpoint_timeout_seconds}")
  if config.data.augment_on is not None:
    choice("data.augment_on", config.data.augment_on, ("host", "device"))
  for key in ("mixup_alpha", "cutmix_alpha"):
    value = config.data[key]
    if not (value == 0 or value > 0) or value == float("inf"):
      raise ValueError(f"config.data.{key} must be 0 (off) or a positive Beta(alpha, alpha) "
                       f"parameter such as 0.2 or 1.0, got {value}")
  for key in ("mix_prob", "switch_prob", "erase_prob"):
    if not 0 <= config.data[key] <= 1:
      raise ValueError(f"config.data.{key} must be a probability in [0, 1], "
                       f"got {config.data[key]}")
  choice("data.erase_mode", config.data.erase_mode, ("pixel", "const", "rand"))
  if not 0 < config.data.device_memory_share <= 1:
    raise ValueError(f"config.data.device_memory_share must be in (0, 1], "
                     f"got {config.data.device_memory_share}")
  if config.data.device_resident and config.data.augment_on == "host":
    raise ValueError("config.data.device_resident keeps the split on the devices, where it is "
                     "augmented: set config.data.augment_on='device' (or leave it None)")
  if config.data.device_resident and config.parallelism == "pmap":
    raise ValueError("config.data.device_resident needs parallelism='jit'")
  if not 0 <= config.ema_decay < 1:
    raise ValueError(f"config.ema_decay must be in [0, 1), got {config.ema_decay}")
  if config.freeze_body and not config.init_from:
    raise ValueError("config.freeze_body trains only the classifier of pretrained weights; set "
                     "config.init_from to a weights file, or leave freeze_body False")


def with_overrides(base: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `base` with dotted-key overrides (lists become tuples); unknown keys are errors."""
  config = copy.deepcopy(base)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      if parent not in node:
        raise KeyError(f"override {key!r}: no field {parent!r} in the training config")
      node = node[parent]
    try:
      node[leaf] = tuple(value) if isinstance(value, list) else value
    except (AttributeError, KeyError) as error:
      raise KeyError(f"override {key!r}: {error}") from None
  return config


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """`config.model_overrides` as keyword arguments for `create_model` (sequences as tuples)."""
  return {k: tuple(v) if isinstance(v, list) else v
          for k, v in config.model_overrides.to_dict().items()}
