"""Batched, sharded, resumable input pipelines on grain over a random-access source.

The stream is defined globally, independent of how many processes read it:
epoch `e` is the permutation `default_rng([seed, e])` of the whole split,
global batch `b` is the next `global_batch` examples of it (the remainder of an
epoch is dropped), and example positions seed their augmentation. Process `p`
of `P` reads only rows `[p*B/P, (p+1)*B/P)` of each global batch, so the
global batch — and therefore training — is the same on one process or many.
The iterator's state is grain's (`next_index` = the step), so a checkpoint
restores the identical next batch.

Evaluation batches cover the split in order and pad the last one; `mask` is 0
on padding, so every example counts exactly once.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any

import grain
import jax
import numpy as np

from cnnjax.data.datasets import read_examples
from cnnjax.data.preprocess import Preprocessing


@dataclasses.dataclass(frozen=True)
class Sharding:
  """Which slice of every global batch this process reads."""

  index: int = 0
  count: int = 1

  @classmethod
  def from_jax(cls) -> Sharding:
    return cls(jax.process_index(), jax.process_count())

  def local_rows(self, global_batch: int) -> slice:
    if global_batch % self.count:
      raise ValueError(f"global batch {global_batch} must be divisible by the number of "
                       f"processes ({self.count})")
    local = global_batch // self.count
    return slice(self.index * local, (self.index + 1) * local)


def _labels(examples: list[dict]) -> np.ndarray:
  return np.asarray([int(e["label"]) for e in examples], np.int32)


def _stack(examples: list[dict], images: list[np.ndarray]) -> dict[str, np.ndarray]:
  return {"image": np.stack(images), "label": _labels(examples)}


def _stack_regions(examples: list[dict], regions: list[np.ndarray],
                   limit: int) -> dict[str, np.ndarray]:
  """Crops of varying size (`host_stages="region"`) in the top-left corner of one zeroed
  `limit` x `limit` canvas each, with their (height, width) as "region"."""
  canvas = np.zeros((len(regions), limit, limit, regions[0].shape[-1]), np.uint8)
  for out, region in zip(canvas, regions):
    out[:region.shape[0], :region.shape[1]] = region
  return {"image": canvas, "region": np.asarray([r.shape[:2] for r in regions], np.int32),
          "label": _labels(examples)}


class TrainBatches:
  """Random access to the training stream: `batches(step)` is this process's part of step's
  batch, {"image": `preprocessing.train` outputs stacked, "label": int32, "index": source rows}.
  With `host_stages="region"` the crops lie on canvases of `region_limit` a side and
  "region" (int32, (height, width) per example) says how much of each they cover.

  `source`: a random-access source (`data_source`); `global_batch`: over all processes;
  `seed`: the permutation's and the augmentation's; `sharding`: which rows this process
  reads. Raises `ValueError` where the split is smaller than one global batch.
  """

  def __init__(self, source, preprocessing: Preprocessing, global_batch: int, seed: int,
               sharding: Sharding = Sharding()):
    self.source = source
    self.size = len(source)
    self.preprocessing = preprocessing
    self.global_batch = global_batch
    self.seed = seed
    self.rows = sharding.local_rows(global_batch)
    self.steps_per_epoch = self.size // global_batch
    if self.steps_per_epoch < 1:
      raise ValueError(f"the training split has {self.size} examples, fewer than one global batch "
                       f"of {global_batch}; lower the batch size")
    self._order_cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

  def epoch_order(self, epoch: int) -> np.ndarray:
    order = self._order_cache.get(epoch)
    if order is None:
      order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
      self._order_cache[epoch] = order
      while len(self._order_cache) > 2:
        self._order_cache.popitem(last=False)
    return order

  def positions(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, positions within the epoch) of this process's rows of global batch `step`."""
    epoch, index = divmod(step, self.steps_per_epoch)
    start = index * self.global_batch
    return epoch, np.arange(start, start + self.global_batch)[self.rows]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, positions = self.positions(step)
    order = self.epoch_order(epoch)
    rngs = [np.random.default_rng([self.seed, epoch, int(p), 1]) for p in positions]
    if hasattr(self.source, "read_encoded"):  # decode only each crop (cnnjax.data.encoded)
      examples = self.source.read_encoded(order[positions])
      images = [self.preprocessing.train_encoded(e["image"], rng)
                for e, rng in zip(examples, rngs)]
    else:
      examples = read_examples(self.source, order[positions])
      images = [self.preprocessing.train(np.asarray(e["image"]), rng)
                for e, rng in zip(examples, rngs)]
    if self.preprocessing.host_stages == "region":
      batch = _stack_regions(examples, images, self.preprocessing.region_limit)
    else:
      batch = _stack(examples, images)
    batch["index"] = order[positions].astype(np.int64)  # source rows: for tests and debugging
    return batch


class ResidentBatches(TrainBatches):
  """The training stream's rows alone, for a split held on the devices: `batches[step]` is
  {"rows": the source rows of this process's part of step's batch}, the same rows in the
  same order as `TrainBatches` reads; the step gathers and augments them on the devices."""

  def __init__(self, num_examples: int, global_batch: int, seed: int,
               sharding: Sharding = Sharding()):
    super().__init__(range(num_examples), None, global_batch, seed, sharding)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, positions = self.positions(step)
    return {"rows": self.epoch_order(epoch)[positions].astype(np.int32)}


class EvalBatches:
  """The split in order, `global_batch` at a time, the last batch padded and masked:
  `batches(index)` is {"image", "label", "mask"} (mask 0 on padding), for `index` below
  `num_batches`."""

  def __init__(self, source, preprocessing: Preprocessing, global_batch: int,
               sharding: Sharding = Sharding()):
    self.source = source
    self.size = len(source)
    self.preprocessing = preprocessing
    self.global_batch = global_batch
    self.rows = sharding.local_rows(global_batch)
    self.num_batches = max(1, math.ceil(self.size / global_batch))

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    positions = np.arange(index * self.global_batch, (index + 1) * self.global_batch)[self.rows]
    real = positions < self.size
    rows = np.where(real, positions, 0)
    if hasattr(self.source, "read_encoded"):
      examples = self.source.read_encoded(rows)
      images = [self.preprocessing.eval_encoded(e["image"]) for e in examples]
    else:
      examples = read_examples(self.source, rows)
      images = [self.preprocessing.eval(np.asarray(e["image"])) for e in examples]
    batch = _stack(examples, images)
    batch["mask"] = real.astype(np.float32)
    batch["label"] = np.where(real, batch["label"], 0).astype(np.int32)
    return batch


def _dataset(start: int, stop: int, make, num_workers: int, num_threads: int,
             prefetch: int) -> grain.IterDataset:
  dataset = grain.MapDataset.range(start, stop).map(make)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                      prefetch_buffer_size=prefetch))
  if num_workers > 0:
    from absl import flags  # noqa: PLC0415

    # grain's workers read absl flags; outside an absl program (notebooks, pytest, our CLI's
    # own FlagValues) nothing parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return dataset


def default_workers(requested: int | None, platform: str | None = None) -> int:
  """`requested`, or for None the platform's default: every usable core on an accelerator
  (the host pipeline bounds training there), 0 on the CPU (the step needs the cores)."""
  if requested is not None:
    if requested < 0:
      raise ValueError(f"config.data.num_workers must be >= 0 (or None for the platform's "
                       f"default), got {requested}")
    return requested
  platform = platform or jax.default_backend()
  if platform == "cpu":
    return 0
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def default_augment_on(requested: str | None, platform: str | None = None) -> str:
  """`requested`, or for None the platform's default: "device" on an accelerator, where the
  host's pipeline bounds training (BENCHMARKS.md: 240 images/s per core on an H100's host
  against 5,866 trained); "host" on the CPU, where the step runs on the cores that would
  otherwise run the pipeline's workers (BENCHMARKS.md, device augmentation on the CPU)."""
  if requested is not None:
    return requested
  return "host" if (platform or jax.default_backend()) == "cpu" else "device"


def train_iterator(batches: TrainBatches, num_steps: int, num_workers: int = 0,
                   num_threads: int = 1, prefetch: int = 2, start_step: int = 0):
  """A grain iterator over steps [start_step, num_steps); `get_state`/`set_state` resume it.

  Its state's form depends on `num_workers`; `start_step` resumes by position alone.
  """
  return iter(_dataset(start_step, num_steps, batches, num_workers, num_threads, prefetch))


def eval_iterator(batches: EvalBatches, num_workers: int = 0, num_threads: int = 1,
                  prefetch: int = 2):
  """A grain iterator over all of `batches` (`EvalBatches`) in order, once."""
  return iter(_dataset(0, batches.num_batches, batches, num_workers, num_threads, prefetch))


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
              keys=("image", "label", "mask", "rows", "region")) -> dict[str, jax.Array]:
  """This process's rows of a batch, assembled into global arrays sharded along the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items() if k in keys}


def prefetch_to_device(iterator, sharding: jax.sharding.Sharding,
                       size: int = 2) -> Iterator[tuple[dict[str, Any], Any]]:
  """(global batch, iterator state after it), keeping `size` batches in flight on the devices.

  The state travels with its batch: the one to checkpoint after a step is the
  one that came with that step's batch, not the iterator's own (it runs ahead).
  """
  queue: collections.deque = collections.deque()
  get_state = getattr(iterator, "get_state", lambda: None)
  for batch in iterator:
    queue.append((to_global(batch, sharding), get_state()))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
