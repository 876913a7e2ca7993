"""Training from a folder of JPEG photos against the same step on synthetic data (a GPU check).

    python -m benchmarks.jpeg_training [--model resnet50] [--dtype bfloat16] [--batch 128]
        [--size 224] [--steps 60] [--images 2560]

The folder is `benchmarks.jpeg_folder`'s (ImageNet-sized crops of the photos matplotlib
and scikit-learn ship). `train_and_evaluate` trains `--model` from it with
`data.augment_on="device"` and the platform's default grain workers; its images/s (the
loop's own measure: steps only) is set against the images/s of the same model, dtype and
batch trained on one fixed batch already on the device (`benchmarks.accelerator`'s
synthetic step). The issue's goal on a GPU: at least 0.9. Writes
benchmarks/results/jpeg_training.json.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

from benchmarks import common


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet50")
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--images", type=int, default=2560)
  args = parser.parse_args(argv)
  from benchmarks import accelerator, jpeg_folder
  from cnnjax import data, train
  from cnnjax.train.config import with_overrides

  run, _ = accelerator.jax_step(args.model, args.size, args.batch, args.dtype)
  synthetic = args.batch / accelerator.interleaved({"synthetic": run}, rounds=3,
                                                   steps=10)["synthetic"]
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "photos"
    jpeg_folder.make_folder(root, args.images)
    data.prepare(f"folder:{root}", pathlib.Path(tmp) / "tfds", progress=False)
    config = with_overrides(train.default_config(), {
        "model": args.model, "dtype": args.dtype, "batch_size": args.batch,
        "data.dataset": f"folder:{root}", "data.data_dir": str(pathlib.Path(tmp) / "tfds"),
        "data.eval_split": f"train[:{args.batch}]", "data.image_size": args.size,
        "data.augment_on": "device", "num_steps": args.steps, "eval_every_epochs": 1000.0,
        "log_every_steps": args.steps, "progress_bar": False, "tensorboard": False})
    result = train.train_and_evaluate(config, pathlib.Path(tmp) / "run")
  payload = {"model": args.model, "dtype": args.dtype, "batch": args.batch, "size": args.size,
             "steps": args.steps, "images": args.images,
             "synthetic_images_per_s": synthetic,
             "jpeg_folder_images_per_s": result["images_per_second"],
             "folder_over_synthetic": result["images_per_second"] / synthetic,
             "data_workers": data.default_workers(None)}
  for key, value in payload.items():
    print(f"{key}: {value}")
  print(common.write("jpeg_training", payload))


if __name__ == "__main__":
  main()
