"""Input-pipeline throughput at 32, 64 and 224 pixels, next to what training consumes.

    python -m benchmarks.input_pipeline [--data_dir DIR] [--no-jpeg_folder]

First the ImageNet-like folder of real JPEG photos against torchvision's
ImageFolder + DataLoader, one core each (`benchmarks.jpeg_folder`: host
images/s per core at 224 px, prepared bytes against the folder's). Then:

Reads procedural images prepared as array_record (gratings at native 64 px for
the 32 px case and 256 px for the 224 px case, with RandAugment(2, 9); scenes
at 96 px cropped to 64 px without it, as the efficientnet_scaling sweep reads
them), decodes, augments (random resized crop, flip), normalises and batches
them with grain; measures images/s for 0 and 2 reader threads, and with the
split decoded once and held in memory (`data.in_memory`). Beside it, the
images/s that a compiled training step consumes at the same size (ResNet-20 at
32 px, the sweep's width-0.25 EfficientNet at 64 px, ResNet-50 at 224 px).
Writes benchmarks/results/input_pipeline.json (with `--sizes`, a subset of the
cases, input_pipeline_<sizes>.json).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import pathlib
import tempfile
import time

import jax

from benchmarks import common
from cnnjax import data
from cnnjax.data import builders, datasets


def _source(data_dir: pathlib.Path, resolution: int, count: int, kind: str = "gratings"):
  config = builders.RenderedConfig(name=f"bench{resolution}px", resolution=resolution,
                                   train_size=count, test_size=8)
  builder_class = {"gratings": builders.Gratings, "scenes": builders.Scenes}[kind]
  builder = builder_class(config=config, data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source(split="train")


def pipeline_rate(source, size: int, batch: int, threads: int, batches: int,
                  workers: int = 0, rand_augment: bool = True) -> float:
  pre = data.Preprocessing(image_size=size, train_crop="random_resized", flip=True,
                           rand_augment=(2, 9.0) if rand_augment else None)
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=None, help="where to prepare the benchmark data "
                      "(default: a temporary directory)")
  parser.add_argument("--sizes", default="32,64,224", help="which cases to measure, by image "
                      "size (comma-separated); a subset writes input_pipeline_<sizes>.json")
  parser.add_argument("--jpeg_folder", action=argparse.BooleanOptionalAction, default=True,
                      help="first, the ImageNet-like JPEG folder against torchvision "
                      "(benchmarks.jpeg_folder, needs torch)")
  args = parser.parse_args(argv)
  sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = pathlib.Path(args.data_dir or tmp)
    cases = [
        {"size": 32, "native": 64, "batch": 128, "count": 2048, "batches": 12,
         "data": "gratings", "rand_augment": True, "model": "resnet20", "overrides": {}},
        {"size": 64, "native": 96, "batch": 64, "count": 2048, "batches": 24,
         "data": "scenes", "rand_augment": False, "model": "efficientnet",
         "overrides": {"width": 0.25, "depth": 0.25, "channel_divisor": 1}},
        {"size": 224, "native": 256, "batch": 16, "count": 256, "batches": 10,
         "data": "gratings", "rand_augment": True, "model": "resnet50", "overrides": {}},
    ]
    unknown = sorted(set(sizes) - {case["size"] for case in cases})
    if unknown:
      parser.error(f"--sizes {unknown} not among the cases {[case['size'] for case in cases]}")
    if args.jpeg_folder:
      from benchmarks import jpeg_folder  # noqa: PLC0415

      jpeg_folder.main([])
    rows = []
    for case in (case for case in cases if case["size"] in sizes):
      source = _source(data_dir, case["native"], case["count"], case["data"])
      row = {k: case[k] for k in ("size", "native", "batch", "data", "rand_augment", "model")}
      rate = functools.partial(pipeline_rate, size=case["size"], batch=case["batch"],
                               batches=case["batches"], rand_augment=case["rand_augment"])
      for threads in (0, 2):
        row[f"pipeline_images_per_s_threads{threads}"] = round(rate(source, threads=threads), 1)
      held = datasets.hold_in_memory(source, (case["native"], case["native"], 3))
      row["pipeline_images_per_s_in_memory"] = round(rate(held, threads=0), 1)
      row["in_memory_speedup"] = round(row["pipeline_images_per_s_in_memory"]
                                       / row["pipeline_images_per_s_threads0"], 2)
      row["training_images_per_s"] = round(
          training_rate(case["model"], case["size"], case["batch"], **case["overrides"]), 1)
      best = max(row["pipeline_images_per_s_threads0"], row["pipeline_images_per_s_threads2"],
                 row["pipeline_images_per_s_in_memory"])
      row["pipeline_over_training"] = round(best / row["training_images_per_s"], 2)
      rows.append(row)
      print(row, flush=True)
  everything = sorted(sizes) == sorted(case["size"] for case in cases)
  name = "input_pipeline" if everything else "input_pipeline_" + "_".join(map(str, sizes))
  path = common.write(name, {
      "command": f"python -m benchmarks.input_pipeline --sizes {args.sizes}",
      "augmentation": "random resized crop, flip, RandAugment(2, 9) where rand_augment, "
                      "normalise",
      "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
