"""The training configuration: every knob of `train_and_evaluate`, with defaults.

`default_config()` returns a locked `ml_collections.ConfigDict`, so a typo in a
key is an error that names it. Experiment configs start from it and override.
Fields left `None` take the value from the model's or the dataset's info
(`image_size`, `num_classes`, `crop_fraction`, `interpolation`, `mean`/`std`).
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections
from ml_collections import config_dict

DTYPES = ("float32", "bfloat16", "float16")
PARALLELISMS = ("jit", "pmap")


def default_config() -> ml_collections.ConfigDict:
  """A new, locked ConfigDict of every training knob with its default (`KEY_DOCS` and the
  documentation's config reference say what each means). Assigning an unknown key raises,
  naming the closest one.

  >>> config = default_config()
  >>> config.optimizer.name = "adamw"
  >>> config.optimizer.nmae = "sgd"
  Traceback (most recent call last):
  ...
  AttributeError: ...Did you mean "name" instead of "nmae"?...
  """
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
  c.fast_compile = False  # opt level 0, XLA's own convolutions: faster compiles, slower steps

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
  from cnnjax.data import device_augment  # noqa: PLC0415

  d = config.data
  device_augment.check_recipe(mixup_alpha=d.mixup_alpha, cutmix_alpha=d.cutmix_alpha,
                              mix_prob=d.mix_prob, switch_prob=d.switch_prob,
                              erase_prob=d.erase_prob, erase_mode=d.erase_mode)
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


# What each key of `default_config()` means: the documentation's config reference is made
# from these and the defaults themselves (`describe`), and a test fails on a key without one.
KEY_DOCS = {
    "seed": "Seeds initialisation, the data order and every per-step key (dropout, augmentation).",
    "model": "A registry name (`cnnjax.list_models()`), e.g. `resnet50`, `efficientnet_b0`, "
             "or a generic family (`efficientnet` with `model_overrides.width/depth`).",
    "model_overrides": "Constructor fields of the model, any the module has (e.g. "
                       "`widths=(8, 16, 32)`, `zero_init_residual=True`); unknown ones are an "
                       "error naming the valid ones.",
    "data.dataset": "An embedded dataset (`digits`, `mnist5k`, `gratings/<R>px`, "
                    "`scenes/<R>px`), a TFDS catalog name prepared as array_record, or "
                    "`folder:/path` (a folder of images, one subfolder per class).",
    "data.data_dir": "Where datasets are prepared: else `$CNNJAX_DATA_DIR`, else "
                     "`~/tensorflow_datasets`.",
    "data.backend": "`grain` (array_record, no TensorFlow) or `tf` (`tfds.load`; needs "
                    "TensorFlow).",
    "data.train_split": "The split trained on (TFDS split syntax, e.g. `train[:90%]`).",
    "data.eval_split": "The split evaluated on.",
    "data.num_classes": "The classifier's size; None: the dataset's number of classes.",
    "data.image_size": "The model's input size; None: the model's own (its `input_size`).",
    "data.train_crop": "`random_resized` (Inception-style), `pad_crop` (CIFAR-style) or "
                       "`resize`.",
    "data.crop_scale": "The random resized crop's range of area fractions.",
    "data.pad": "Padding of `pad_crop`, in pixels.",
    "data.flip": "Random horizontal flips in training.",
    "data.rand_augment_ops": "RandAugment's N, operations per image; 0 turns it off.",
    "data.rand_augment_magnitude": "RandAugment's M, on the paper's 0..30 scale.",
    "data.crop_fraction": "Evaluation's centre crop as a share of the resized shorter side; "
                          "None: the model's.",
    "data.interpolation": "`bilinear`, `bicubic` or `nearest`; None: the model's.",
    "data.mean": "Per-channel mean on the 0..1 scale; None: the model's.",
    "data.std": "Per-channel standard deviation on the 0..1 scale; None: the model's.",
    "data.augment_on": "Where crop, flip and RandAugment run: `host` (grain workers, PIL) or "
                       "`device` (in the jitted step). None: `device` on GPU and TPU, `host` on "
                       "the CPU (`cnnjax.data.default_augment_on`).",
    "data.device_resident": "Put the training split on the devices once, as uint8; each step "
                            "gathers and augments its rows there, and the host does nothing "
                            "per step. Needs images of one size.",
    "data.device_memory_share": "The largest share of one device's memory a resident split "
                                "may take; a bigger split stays on the host, with a warning "
                                "giving both sizes.",
    "data.mixup_alpha": "timm's mixup: Beta(alpha, alpha) for the mixing weight; 0 turns it "
                        "off.",
    "data.cutmix_alpha": "timm's cutmix: Beta(alpha, alpha) for the kept area; 0 turns it off.",
    "data.mix_prob": "The probability that a batch is mixed (mixup or cutmix).",
    "data.switch_prob": "With both on, the probability of cutmix rather than mixup.",
    "data.erase_prob": "timm's random erasing: the probability per image (after "
                       "normalisation); 0 turns it off.",
    "data.erase_mode": "What erasing fills in: `pixel` (per-pixel noise), `rand` (one noise "
                       "colour) or `const` (zeros).",
    "data.in_memory": "Decode each split once and hold the arrays (images of one size that fit "
                      "in memory).",
    "data.num_workers": "grain worker processes; None: every usable core on an accelerator, "
                        "0 on the CPU (`cnnjax.data.default_workers`).",
    "data.num_threads": "grain reader threads per process.",
    "data.prefetch": "Batches prepared ahead, on the host and on the devices.",
    "batch_size": "The global batch, over all devices of all processes.",
    "eval_batch_size": "The evaluation batch; None: `batch_size`.",
    "num_epochs": "How long to train, in epochs (fractions allowed).",
    "num_steps": "How long to train, in steps; overrides `num_epochs` when set.",
    "optimizer.name": "`sgd`, `rmsprop` (the original EfficientNet's), `adam`, `adamw`, "
                      "`lars` or `lamb`.",
    "optimizer.learning_rate": "The peak learning rate (per 256 images with `scale_by_batch`).",
    "optimizer.scale_by_batch": "Scale the learning rate by batch_size / 256.",
    "optimizer.momentum": "SGD's and RMSProp's momentum.",
    "optimizer.nesterov": "Nesterov momentum for SGD.",
    "optimizer.rms_decay": "RMSProp's decay of the squared-gradient average.",
    "optimizer.eps": "The optimizer's epsilon; None: its own default.",
    "optimizer.b1": "Adam's, AdamW's and LAMB's first-moment decay.",
    "optimizer.b2": "Adam's, AdamW's and LAMB's second-moment decay.",
    "optimizer.trust_coefficient": "LARS's trust coefficient.",
    "optimizer.weight_decay": "Weight decay; BatchNorm parameters and biases are spared.",
    "optimizer.weight_decay_mode": "`coupled` (an L2 term in the loss) or `decoupled` "
                                   "(applied to the weights, as AdamW).",
    "optimizer.clip_norm": "Clip gradients to this global norm; None: no clipping.",
    "optimizer.schedule": "`constant`, `multistep`, `cosine` or `exponential`, after any "
                          "warmup.",
    "optimizer.warmup_epochs": "Linear warmup from 0, in epochs.",
    "optimizer.boundaries_epochs": "`multistep`'s boundaries, in epochs.",
    "optimizer.decay_factor": "`multistep`'s factor at each boundary.",
    "optimizer.decay_epochs": "`exponential`'s period, in epochs.",
    "optimizer.decay_rate": "`exponential`'s factor per period.",
    "optimizer.final_fraction": "`cosine`'s final rate as a share of the peak.",
    "init_from": "Start from pretrained weights (any file `cnnjax.load_weights` reads); a "
                 "classifier of another size starts afresh. A resumed run reads its own "
                 "checkpoints instead.",
    "freeze_body": "With `init_from`: train the classifier only; the body keeps its weights and "
                   "runs in inference mode.",
    "label_smoothing": "Label smoothing of the training targets (mixed targets too).",
    "aux_loss_weight": "The weight of auxiliary classifiers' losses (GoogLeNet).",
    "ema_decay": "Above 0: keep an exponential moving average of weights and BatchNorm "
                 "statistics, and evaluate it.",
    "dtype": "The compute dtype: `float32`, `bfloat16` or `float16` (with dynamic loss "
             "scaling); parameters stay float32.",
    "initial_loss_scale": "float16's initial dynamic loss scale.",
    "parallelism": "`jit` (one step over a Mesh with NamedSharding) or `pmap` (the same "
                   "numbers).",
    "ghost_batch_norm": "BatchNorm statistics per device rather than of the global batch.",
    "fast_compile": ("XLA optimisation level 0 and XLA's own convolutions (no CPU lowering): "
                     "faster compiles, slower steps (smoke runs)."),
    "eval_every_epochs": "How often to evaluate (and checkpoint), in epochs.",
    "log_every_steps": "How often to log training metrics, in steps.",
    "checkpoint_every_epochs": "Also checkpoint this often between evaluations; None: only at "
                               "evaluations.",
    "keep_checkpoints": "How many of the newest checkpoints to keep.",
    "best_metric": "Also keep the best checkpoint by this evaluation metric (e.g. `top1`, or "
                   "`loss`, lower is better); None: no best checkpoint.",
    "async_checkpoint": "Write checkpoints in the background (Orbax's asynchronous save).",
    "checkpoint_timeout_seconds": "Orbax's limit on an asynchronous commit (None: its "
                                  "1,200 s); a suspended process exceeds it and the run "
                                  "writes that checkpoint again.",
    "save_on_signals": "Signals that end a run after its current step with a checkpoint and "
                       "exit code 75 (`cnnjax.train.preemption`); `()` turns this off.",
    "progress_bar": "A progress bar on a terminal (plain lines in a log file).",
    "tensorboard": "Write TensorBoard events beside `metrics.jsonl`.",
    "stop_after_steps": "Stop (with a checkpoint) after this step, to resume later; the run's "
                        "result is unchanged.",
    "distributed.coordinator_address": "`host:port` of process 0 for "
                                       "`jax.distributed.initialize`; else "
                                       "`$JAX_COORDINATOR_ADDRESS`; None: one process.",
    "distributed.num_processes": "The number of processes; else `$JAX_NUM_PROCESSES`.",
    "distributed.process_id": "This process's index; else `$JAX_PROCESS_ID`.",
}


def flat_keys(config: ml_collections.ConfigDict) -> dict:
  """Every leaf key of `config` (dotted) with its value; an empty group is a key of its own."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and len(value):
      out.update({f"{key}.{k}": v for k, v in flat_keys(value).items()})
    else:
      out[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return out


def describe(config: ml_collections.ConfigDict | None = None) -> list[tuple[str, Any, str]]:
  """(key, default, meaning) for every key of `config` (default: `default_config()`), in
  order; the meaning is "" where `KEY_DOCS` has none.

  >>> keys = {key: (default, meaning) for key, default, meaning in describe()}
  >>> keys["optimizer.name"][0], keys["optimizer.name"][1].split(",")[0]
  ('sgd', '`sgd`')
  """
  config = default_config() if config is None else config
  return [(key, value, KEY_DOCS.get(key, "")) for key, value in flat_keys(config).items()]
