"""Training throughput on one accelerator: cnnjax against PyTorch on the same card.

    python -m benchmarks.accelerator [--models resnet50,efficientnet_b0] [--batches 128,256]
        [--dtypes bfloat16,float32] [--rounds 5] [--steps 10] [--pipeline_workers 0,4,8,12]

For each model at 224 px, batch size and dtype: images/s of a full training
step (forward, softmax cross-entropy, backward, SGD with momentum 0.9) and its
fraction of the card's peak (FLOPs from `cnnjax.flops`, training counted as
3x the forward pass), measured against the same card's matmul peak in that
dtype (a 8192^3 `jnp.dot`) and, where the card is known, its data-sheet peak.

- cnnjax: one compiled `jax.jit` step from `cnnjax.train.steps` (state
  donated), `dtype` the compute dtype, parameters float32 (what
  `config.dtype` does in training).
- PyTorch: torchvision's `resnet50`, timm's `tf_efficientnet_b0` (the TF
  original that cnnjax's EfficientNet is; torchvision's `efficientnet_b0`
  without timm) in `channels_last`, under `autocast(bfloat16)` for bfloat16,
  with TF32 allowed for float32 — JAX's default precision on GPU also uses
  TF32 for float32 convolutions and matmuls.

Steps run in interleaved rounds: `--steps` steps of cnnjax, then of PyTorch,
each timed to the device's completion, `--rounds` times; medians are compared.

The input pipeline (`cnnjax.data`: array_record gratings at 256 px, random
resized crop to 224, flip, RandAugment(2, 9), batch 128) is timed with
several grain worker processes, beside what the fastest step consumes, to
show whether the data can feed the card. It needs tensorflow-datasets, grain
and array_record; without them it is skipped with the install command.

Runs from the repository on a machine with jax's CUDA plugin and PyTorch
(Python >= 3.10, jax 0.10-0.11); nothing else of cnnjax's is needed for the
training part. Writes benchmarks/results/accelerator.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback

CLASSES = 1000
# Dense (no sparsity) data-sheet peaks, TFLOP/s, by a substring of jax's device_kind.
DATASHEET_TFLOPS = {
    "H200": {"bfloat16": 989.4, "float32": 494.7},
    "H100 80GB HBM3": {"bfloat16": 989.4, "float32": 494.7},   # SXM
    "H100 PCIe": {"bfloat16": 756.0, "float32": 378.0},
    "H100": {"bfloat16": 989.4, "float32": 494.7},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}
TORCH_MODELS = {"resnet50": ("torchvision", "resnet50"),
                "efficientnet_b0": ("timm", "tf_efficientnet_b0")}


def matmul_peak_tflops(dtype: str, n: int = 8192, repeats: int = 10) -> float:
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), dtype=getattr(jnp, dtype))
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, a))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(dot(a, a))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times) / 1e12


def datasheet_tflops(device_kind: str, dtype: str) -> float | None:
  for key, peaks in DATASHEET_TFLOPS.items():
    if key in device_kind:
      return peaks[dtype]
  return None


def jax_step(name: str, size: int, batch: int, dtype: str):
  """A function that runs `steps` training steps of cnnjax and waits for them."""
  import jax
  import jax.numpy as jnp

  from benchmarks import common

  setup = common.sgd_training(name, size, batch, num_classes=CLASSES,
                              dtype=getattr(jnp, dtype))
  holder = {"state": setup.state}

  def run(steps: int):
    for _ in range(steps):
      holder["state"], metrics = setup.train(holder["state"], setup.batch)
    jax.block_until_ready(metrics)

  return run, setup.model


def torch_step(name: str, size: int, batch: int, dtype: str):
  import torch

  library, builder = TORCH_MODELS[name]
  if library == "timm":
    try:
      import timm
      model = timm.create_model(builder, num_classes=CLASSES)
    except ImportError:
      import torchvision
      model = torchvision.models.efficientnet_b0(num_classes=CLASSES)
  else:
    import torchvision
    model = getattr(torchvision.models, builder)(num_classes=CLASSES)
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  device = torch.device("cuda")
  model = model.to(device, memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()
  images = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
  labels = torch.arange(batch, device=device) % CLASSES
  autocast = dtype == "bfloat16"

  def run(steps: int):
    for _ in range(steps):
      optimizer.zero_grad(set_to_none=True)
      with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn(model(images), labels)
      loss.backward()
      optimizer.step()
    torch.cuda.synchronize()

  return run


def interleaved(runs: dict, rounds: int, steps: int) -> dict[str, float]:
  """Median seconds per step of each run, `steps` at a time, in alternating rounds."""
  for run in runs.values():
    run(2)  # compile / cuDNN autotuning, then one warm step
  times = {key: [] for key in runs}
  for _ in range(rounds):
    for key, run in runs.items():
      start = time.perf_counter()
      run(steps)
      times[key].append((time.perf_counter() - start) / steps)
  return {key: statistics.median(values) for key, values in times.items()}


@dataclasses.dataclass
class Row:
  model: str
  batch: int
  dtype: str
  cnnjax_images_per_s: float
  torch_images_per_s: float | None
  ratio_cnnjax_over_torch: float | None
  cnnjax_fraction_of_matmul_peak: float
  cnnjax_fraction_of_datasheet_peak: float | None
  torch_fraction_of_matmul_peak: float | None


def pipeline_rates(workers: list[int], size: int, batch: int = 128, batches: int = 20) -> dict:
  try:
    from benchmarks import input_pipeline
  except ImportError as error:
    return {"skipped": f"{error}: pip install tensorflow-datasets grain array_record "
                       f"ml_collections (or pip install -e . in the repository)"}
  rates = {}
  with tempfile.TemporaryDirectory() as tmp:
    native = max(16, size * 8 // 7 // 16 * 16)  # 256 for 224: crops from a larger image
    # Two batches of images, read over and over: reading, decoding and augmenting cost the
    # same for an image seen before, and rendering them is slow (~12 images/s per core).
    source = input_pipeline._source(pathlib.Path(tmp), native, 2 * batch)
    for count in workers:
      rates[f"workers_{count}"] = round(input_pipeline.pipeline_rate(
          source, size, batch, threads=2, batches=batches, workers=count), 1)
  return {"batch": batch, "images_per_s": rates}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="resnet50,efficientnet_b0",
                      help="'' times the input pipeline alone")
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--peak_n", type=int, default=8192, help="matmul size of the peak")
  parser.add_argument("--batches", default="128,256")
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--pipeline_workers", default="0,4,8,12",
                      help="grain worker processes to time the input pipeline with ('' skips)")
  parser.add_argument("--pipeline_batch", type=int, default=128)
  parser.add_argument("--pipeline_batches", type=int, default=20, help="batches timed per count")
  parser.add_argument("--no_torch", action="store_true", help="time cnnjax alone")
  parser.add_argument("--output", default="accelerator")
  args = parser.parse_args(argv)
  if args.pipeline_batches < 1:
    parser.error(f"--pipeline_batches must be at least 1, got {args.pipeline_batches}")

  # PyTorch runs in this process too: JAX's default of taking 75% of the card's memory
  # up front would leave it too little for ResNet-50 at batch 256.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax

  from benchmarks import common
  from cnnjax import analysis

  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}), jax {jax.__version__}", flush=True)
  dtypes = args.dtypes.split(",")
  peaks = {dtype: matmul_peak_tflops(dtype, args.peak_n) for dtype in dtypes}
  print(f"matmul peak (TFLOP/s): {peaks}", flush=True)
  rows, errors = [], []
  torch_version = None
  if not args.no_torch:
    import torch
    torch_version = torch.__version__

  def record(pipeline: dict) -> pathlib.Path:
    # Rewritten after every row, so a run stopped part-way keeps what it measured.
    return common.write(args.output, {
        "command": "python -m benchmarks.accelerator " + " ".join(argv or sys.argv[1:]),
        "device": device.device_kind, "jax": jax.__version__, "size": args.size,
        "torch": torch_version, "matmul_peak_tflops": peaks, "rows": rows, "errors": errors,
        "input_pipeline": pipeline})

  for name in filter(None, args.models.split(",")):
    for batch in map(int, args.batches.split(",")):
      for dtype in dtypes:
        try:
          jax_run, model = jax_step(name, args.size, batch, dtype)
          runs = {"jax": jax_run}
          if not args.no_torch:
            runs["torch"] = torch_step(name, args.size, batch, dtype)
          seconds = interleaved(runs, args.rounds, args.steps)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: record it, go on
          errors.append({"model": name, "batch": batch, "dtype": dtype,
                         "error": f"{type(error).__name__}: {error}"[:500]})
          traceback.print_exc()
          continue
        step_flop = 3 * analysis.flops(model, args.size) * batch
        sheet = datasheet_tflops(device.device_kind, dtype)
        torch_s = seconds.get("torch")
        row = Row(
            model=name, batch=batch, dtype=dtype,
            cnnjax_images_per_s=round(batch / seconds["jax"], 1),
            torch_images_per_s=round(batch / torch_s, 1) if torch_s else None,
            ratio_cnnjax_over_torch=(round(torch_s / seconds["jax"], 3) if torch_s else None),
            cnnjax_fraction_of_matmul_peak=round(step_flop / seconds["jax"] / 1e12 / peaks[dtype], 3),
            cnnjax_fraction_of_datasheet_peak=(round(step_flop / seconds["jax"] / 1e12 / sheet, 3)
                                               if sheet else None),
            torch_fraction_of_matmul_peak=(round(step_flop / torch_s / 1e12 / peaks[dtype], 3)
                                           if torch_s else None))
        rows.append(dataclasses.asdict(row))
        print(json.dumps(rows[-1]), flush=True)
        record({"pending": "timed after the training rows"})
  workers = [int(w) for w in args.pipeline_workers.split(",") if w]
  pipeline = (pipeline_rates(workers, args.size, args.pipeline_batch, args.pipeline_batches) if workers
              else {"skipped": "--pipeline_workers ''"})
  print(f"input pipeline at {args.size} px: {pipeline}", flush=True)
  path = record(pipeline)
  print(f"wrote {path}\n")
  print(markdown(rows))


def markdown(rows: list[dict]) -> str:
  """The table BENCHMARKS.md shows."""
  lines = ["| model | batch | dtype | cnnjax img/s | PyTorch img/s | cnnjax/PyTorch throughput | "
           "cnnjax % of matmul peak |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    ratio = r["ratio_cnnjax_over_torch"]
    lines.append(f"| {r['model']} | {r['batch']} | {r['dtype']} | {r['cnnjax_images_per_s']:.0f} | "
                 f"{r['torch_images_per_s'] or '-'} | {ratio if ratio else '-'} | "
                 f"{100 * r['cnnjax_fraction_of_matmul_peak']:.0f}% |")
  return "\n".join(lines)


if __name__ == "__main__":
  main()
