"""Input-pipeline throughput at 32 and 224 pixels, next to what training consumes.

    python -m benchmarks.input_pipeline [--data_dir DIR]

Reads procedural gratings prepared as array_record (native 64 px for the 32 px
case, 256 px for the 224 px case), decodes, augments (random resized crop,
flip, RandAugment(2, 9)), normalises and batches them with grain; measures
images/s for 0 and 2 reader threads. Beside it, the images/s that a compiled
training step consumes at the same size (ResNet-20 at 32 px, ResNet-50 at
224 px). Writes benchmarks/results/input_pipeline.json.
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import tempfile
import time

import jax

from benchmarks import common
from cnnjax import data
from cnnjax.data import builders


def _source(data_dir: pathlib.Path, resolution: int, count: int):
  config = builders.RenderedConfig(name=f"bench{resolution}px", resolution=resolution,
                                   train_size=count, test_size=8)
  builder = builders.Gratings(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source(split="train")


def pipeline_rate(source, size: int, batch: int, threads: int, batches: int,
                  workers: int = 0) -> float:
  pre = data.Preprocessing(image_size=size, train_crop="random_resized", flip=True,
                           rand_augment=(2, 9.0))
  stream = data.TrainBatches(source, pre, batch, seed=0)
  prefetch = 4
  # Start-up, then what the workers and the prefetch buffer made meanwhile: with 8 workers
  # timing from the first batch on counted 8 batches made in parallel during start-up
  # (16,000 img/s on an H100 machine's 16 cores, where 4 workers gave 950).
  warmup = 1 + prefetch + 2 * workers
  iterator = data.train_iterator(stream, num_steps=warmup + batches, num_workers=workers,
                                 num_threads=threads, prefetch=prefetch)
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for batch_ in itertools.islice(iterator, batches):
    del batch_
  return batches * batch / (time.perf_counter() - start)


def training_rate(model_name: str, size: int, batch: int, **overrides) -> float:
  setup = common.sgd_training(model_name, size, batch, **overrides)
  holder = {"state": setup.state}

  def step():
    holder["state"], metrics = setup.train(holder["state"], setup.batch)
    jax.block_until_ready(metrics)

  return batch / common.median_seconds(step, repeats=5, warmup=2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=None, help="where to prepare the benchmark data "
                      "(default: a temporary directory)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = pathlib.Path(args.data_dir or tmp)
    cases = [
        {"size": 32, "native": 64, "batch": 128, "count": 2048, "batches": 12,
         "model": "resnet20", "overrides": {}},
        {"size": 224, "native": 256, "batch": 16, "count": 256, "batches": 10,
         "model": "resnet50", "overrides": {}},
    ]
    rows = []
    for case in cases:
      source = _source(data_dir, case["native"], case["count"])
      row = {k: case[k] for k in ("size", "native", "batch", "model")}
      for threads in (0, 2):
        row[f"pipeline_images_per_s_threads{threads}"] = round(
            pipeline_rate(source, case["size"], case["batch"], threads, case["batches"]), 1)
      row["training_images_per_s"] = round(
          training_rate(case["model"], case["size"], case["batch"], **case["overrides"]), 1)
      best = max(row["pipeline_images_per_s_threads0"], row["pipeline_images_per_s_threads2"])
      row["pipeline_over_training"] = round(best / row["training_images_per_s"], 2)
      rows.append(row)
      print(row, flush=True)
  path = common.write("input_pipeline", {
      "command": "python -m benchmarks.input_pipeline",
      "augmentation": "random resized crop, flip, RandAugment(2, 9), normalise",
      "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
