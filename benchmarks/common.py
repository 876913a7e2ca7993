"""What benchmarks share: the machine and the date beside every result, medians, and the
SGD training step they time."""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import random
import statistics
import time
from typing import Any

RESULTS = pathlib.Path(__file__).parent / "results"


def machine() -> dict:
  from cnnjax.experiments import reports  # noqa: PLC0415

  return reports.machine()


def write(name: str, payload: dict) -> pathlib.Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}.json"
  record = {"date": datetime.date.today().isoformat(), "machine": machine(), **payload}
  path.write_text(json.dumps(record, indent=1))
  return path


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def interleaved(callables: dict, rounds: int, warmup: int = 2) -> dict:
  """Median seconds per callable, timed in alternation so all see the same machine state."""
  return medians(interleaved_times(callables, rounds, warmup))


def medians(times: dict[str, list[float]]) -> dict[str, float]:
  return {key: statistics.median(values) for key, values in times.items()}


def interleaved_times(callables: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
  """Seconds of every round per callable; round i of each ran back to back.

  Each round runs the callables in a new (seeded) order: a step timed always right after
  the same heavy one inherits its cache and thread-pool state, which measured up to 1.7x
  on a 45 ms inference step.
  """
  for fn in callables.values():
    for _ in range(warmup):
      fn()
  times = {key: [] for key in callables}
  order = list(callables)
  shuffle = random.Random(0).shuffle
  for _ in range(rounds):
    shuffle(order)
    for key in order:
      fn = callables[key]
      start = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - start)
  return times


@dataclasses.dataclass
class SgdTraining:
  """A model's compiled SGD (momentum 0.9) training step on one device, its state and a batch."""
  model: Any
  train: Any
  state: Any
  batch: dict


def sgd_training(model_name: str, size: int, batch_size: int, num_classes: int = 10,
                 xla_options: dict | None = None, **overrides) -> SgdTraining:
  """`xla_options` replace cnnjax's compiler options ({}: XLA's defaults)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  import cnnjax  # noqa: PLC0415
  from cnnjax.train import optim, steps  # noqa: PLC0415

  model = cnnjax.create_model(model_name, num_classes=num_classes, **overrides)
  tx = optim.make_optimizer("sgd", optim.schedule_shape("constant", 1, 1), learning_rate=0.01,
                            momentum=0.9)
  train, _ = steps.jit_steps(model, tx, steps.StepConfig(), steps.make_mesh(jax.devices()[:1]),
                             xla_options=xla_options)
  state = steps.init_state(model, tx, (size, size, 3), seed=0)
  batch = {"image": jax.random.normal(jax.random.key(0), (batch_size, size, size, 3)),
           "label": jnp.arange(batch_size, dtype=jnp.int32) % num_classes}
  return SgdTraining(model, train, state, batch)
