"""Host input pipeline on an ImageNet-like folder of JPEG photos: cnnjax against torchvision.

    python -m benchmarks.jpeg_folder [--images 600] [--batches 12]   # pin it: taskset -c 0

The folder: `--images` JPEGs (quality 90) in 10 class folders, cut from the
real photos that matplotlib (grace_hopper.jpg) and scikit-learn (china.jpg,
flower.jpg) ship: random crops resized so that their short side is 333-500 px,
as ImageNet's. Prepared by cnnjax (`folder:<root>`: the files' bytes as they
are); the prepared copy's bytes against the folder's, and the time it took.

Training transforms, the same on both sides: random resized crop to 224 (scale
0.08-1, bilinear), horizontal flip. One process, the reading in it (cnnjax:
0 workers, 0 threads; torchvision: `DataLoader(num_workers=0)`), batch 64,
`torch.set_num_threads(1)`: images per second per core. cnnjax's batches are
uint8, as the training loop sends them (the step normalises on the device);
its float32 output (normalised on the host) is measured too, and torchvision's
`ToTensor` + `Normalize` make float32 as its loaders do. With
`data.augment_on = "device"` the host only decodes each crop's region at the
DCT scale and lays it on a 448 px canvas (`cnnjax_device_host_side`,
`host_stages="region"`, what the training loop does for such a folder); the
step resizes it and does the rest. That is set against torchvision with and
without RandAugment(2, 9), which cnnjax then runs in the step. The host
resizing the crop itself (`host_stages="crop"`) and cnnjax's host-side
RandAugment are measured too. Runs alternate batch by batch. Writes
benchmarks/results/jpeg_folder.json. `python -m benchmarks.input_pipeline`
runs it first.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np

from benchmarks import common

SIZE, BATCH = 224, 64


def make_folder(root: pathlib.Path, count: int, seed: int = 0) -> list[pathlib.Path]:
  import matplotlib
  import sklearn
  from PIL import Image

  photos = [pathlib.Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
            pathlib.Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
            pathlib.Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]
  sources = [Image.open(p).convert("RGB") for p in photos]
  rng = np.random.default_rng(seed)
  paths = []
  for index in range(count):
    image = sources[index % len(sources)]
    width, height = image.size
    w = int(rng.integers(width // 2, width + 1))
    h = int(np.clip(w * rng.uniform(0.6, 0.9), 16, height))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    short = int(rng.integers(333, 501))
    scale = short / min(w, h)
    crop = image.crop((left, top, left + w, top + h)).resize(
        (round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    path = root / f"class{index % 10}" / f"{index:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    crop.save(path, quality=90)
    paths.append(path)
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=600)
  parser.add_argument("--batches", type=int, default=12)
  args = parser.parse_args(argv)
  import torch
  import torchvision
  from torchvision import transforms

  from cnnjax import data

  torch.set_num_threads(1)
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "photos"
    files = make_folder(root, args.images)
    folder_bytes = sum(p.stat().st_size for p in files)
    started = time.perf_counter()
    data.prepare(f"folder:{root}", pathlib.Path(tmp) / "tfds", progress=False)
    prepare_seconds = time.perf_counter() - started
    prepared_bytes = sum(p.stat().st_size for p in (pathlib.Path(tmp) / "tfds").rglob("*")
                         if p.is_file())
    source = data.data_source(f"folder:{root}", "train", pathlib.Path(tmp) / "tfds")

    def cnnjax_reader(output, rand_augment=None, host_stages="all"):
      pre = data.Preprocessing(image_size=SIZE, train_crop="random_resized", flip=True,
                               output=output, rand_augment=rand_augment, host_stages=host_stages)
      stream = data.TrainBatches(source, pre, BATCH, seed=0)
      step = iter(range(10**9))
      return lambda: stream(next(step) % stream.steps_per_epoch)

    normalise = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    folder = torchvision.datasets.ImageFolder(str(root), transforms.Compose([
        transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), normalise]))
    folder_randaugment = torchvision.datasets.ImageFolder(str(root), transforms.Compose([
        transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
        transforms.RandAugment(2, 9), transforms.ToTensor(), normalise]))

    def torch_reader(folder=folder):
      loader = torch.utils.data.DataLoader(folder, batch_size=BATCH, shuffle=True, num_workers=0,
                                           drop_last=True)
      iterator = iter(loader)
      def next_batch():
        nonlocal iterator
        try:
          return next(iterator)
        except StopIteration:
          iterator = iter(loader)
          return next(iterator)
      return next_batch

    readers = {"cnnjax_uint8": cnnjax_reader("uint8"), "cnnjax_float32": cnnjax_reader("float32"),
               "torchvision": torch_reader(),
               # augment_on="device": the host decodes the crop, the step does the rest
               # (resize, flip, RandAugment, normalisation), whatever the recipe.
               "cnnjax_device_host_side": cnnjax_reader("uint8", host_stages="region"),
               "cnnjax_device_host_resizes": cnnjax_reader("uint8", host_stages="crop"),
               "cnnjax_randaugment_uint8": cnnjax_reader("uint8", rand_augment=(2, 9.0)),
               "torchvision_randaugment": torch_reader(folder_randaugment)}
    seconds = {name: [] for name in readers}
    for name, read in readers.items():  # warm-up: imports, first reads
      read()
    for _ in range(args.batches):
      for name, read in readers.items():
        started = time.perf_counter()
        read()
        seconds[name].append(time.perf_counter() - started)
  rates = {name: BATCH / float(np.median(times)) for name, times in seconds.items()}
  payload = {
      "images": args.images, "image_size": SIZE, "batch": BATCH, "batches": args.batches,
      "folder_bytes": folder_bytes, "prepared_bytes": prepared_bytes,
      "prepared_over_folder": prepared_bytes / folder_bytes,
      "prepare_seconds": prepare_seconds, "prepare_images_per_s": args.images / prepare_seconds,
      "images_per_s": rates,
      "cnnjax_uint8_over_torchvision": rates["cnnjax_uint8"] / rates["torchvision"],
      "cnnjax_float32_over_torchvision": rates["cnnjax_float32"] / rates["torchvision"],
      "device_host_side_over_torchvision": rates["cnnjax_device_host_side"] / rates["torchvision"],
      "device_host_resizes_over_torchvision": (rates["cnnjax_device_host_resizes"]
                                               / rates["torchvision"]),
      "device_host_side_over_torchvision_randaugment": (rates["cnnjax_device_host_side"]
                                                        / rates["torchvision_randaugment"]),
      "cnnjax_randaugment_over_torchvision_randaugment": (rates["cnnjax_randaugment_uint8"]
                                                          / rates["torchvision_randaugment"]),
  }
  for key, value in payload.items():
    print(f"{key}: {value}")
  print(common.write("jpeg_folder", payload))


if __name__ == "__main__":
  main()
