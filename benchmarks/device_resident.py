"""The efficientnet_scaling base trial fed three ways: images/s and the data path's host CPU.

    python -m benchmarks.device_resident [--steps 120]   # pin it: taskset -c 0

The sweep's base trial (width 0.25, depth 0.25, 64 px from 96-px scenes, batch 64,
AdamW) as its config has it, `--steps` steps each, one after another in one process:
- `host`: today's path: the split decoded once and held in memory (`data.in_memory`),
  crop and normalisation on the host (`data.augment_on = "host"`);
- `device`: the host sends the held 96-px images; the step crops them
  (`augment_on = "device"`);
- `resident`: the split put on the device once (`data.device_resident`); the host sends
  only each step's row numbers.
Reports the training images/s (the loop's own measure: steps only, no compile, evaluation
or checkpoints) and the CPU time the data path takes on the host per step: the thread CPU
time of making each batch (grain's reader thread) plus handing it to the device.
Writes benchmarks/results/device_resident.json.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

from benchmarks import common
from cnnjax import train
from cnnjax.data import pipeline

ARMS = {
    "host": {"data.augment_on": "host"},
    "device": {"data.augment_on": "device"},
    "resident": {"data.augment_on": "device", "data.device_resident": True},
}


def _timed(function, totals: dict, name: str):
  @functools.wraps(function)
  def wrapper(*args, **kwargs):
    start = time.thread_time()
    try:
      return function(*args, **kwargs)
    finally:
      totals[name] = totals.get(name, 0.0) + time.thread_time() - start
  return wrapper


def run_arm(overrides: dict, steps: int) -> dict:
  from experiments.configs import efficientnet_scaling

  from cnnjax.train.config import with_overrides

  config = with_overrides(efficientnet_scaling.get_config().train, {
      **overrides, "num_steps": steps, "eval_every_epochs": 1000.0,
      "checkpoint_every_epochs": None, "log_every_steps": steps})
  totals: dict = {}
  patches = [(pipeline.TrainBatches, "__call__"), (pipeline.ResidentBatches, "__call__"),
             (pipeline, "to_global")]
  originals = [getattr(owner, name) for owner, name in patches]
  for (owner, name), original in zip(patches, originals):
    setattr(owner, name, _timed(original, totals, name if owner is pipeline else owner.__name__))
  try:
    with tempfile.TemporaryDirectory() as workdir:
      result = train.train_and_evaluate(config, workdir)
  finally:
    for (owner, name), original in zip(patches, originals):
      setattr(owner, name, original)
  # Every batch made, prefetched ones included, is counted and divided by the steps taken.
  return {"images_per_s": result["images_per_second"],
          "host_data_cpu_ms_per_step": 1e3 * sum(totals.values()) / steps,
          "host_data_cpu_ms_by_part": {k: 1e3 * v / steps for k, v in totals.items()},
          "compile_seconds": result["compile_seconds"]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--arms", default=",".join(ARMS))
  args = parser.parse_args(argv)
  results = {name: run_arm(ARMS[name], args.steps) for name in args.arms.split(",")}
  host = results.get("host", {}).get("images_per_s")
  payload = {"steps": args.steps, "batch": 64, "arms": results,
             "over_host": {k: v["images_per_s"] / host for k, v in results.items()} if host else {}}
  for key, value in payload.items():
    print(f"{key}: {value}")
  print(common.write("device_resident", payload))


if __name__ == "__main__":
  main()
