"""Per-example image preprocessing in NumPy/PIL, parameterised by resolution.

Training: Inception-style random resized crop, CIFAR-style pad-and-crop or a
plain resize, horizontal flip, RandAugment(N, M). Evaluation: resize so that
the centre crop covers `crop_fraction` of the shorter side, then crop.
Everything takes an explicit `np.random.Generator`, so an example's
augmentation is a pure function of the seed and its position in the stream.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from cnnjax.data import encoded as encoded_lib

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                  "nearest": Image.Resampling.NEAREST}
TRAIN_CROPS = ("random_resized", "pad_crop", "resize")
OUTPUTS = ("float32", "uint8")
# What the host does of training's transforms, with config.data.augment_on = "device" for all
# but "all": everything; the crop, resized ("crop": pad_crop and resize from images of varying
# size); the crop's region, not resized ("region": the random resized crop from images of
# varying size; the device resizes it); or nothing but decode (the device crops from the
# stored image, which has one fixed size).
HOST_STAGES = ("all", "crop", "region", "none")


def _pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _array(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(image)
  return array[..., None] if array.ndim == 2 else array[..., :channels]


def resize(image: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
  """Resizes a uint8 HWC image to (height, width), antialiased when shrinking."""
  if image.shape[:2] == tuple(size):
    return image
  method = INTERPOLATIONS[interpolation]
  return _array(_pil(image).resize((size[1], size[0]), method), image.shape[-1])


def sample_crop(height: int, width: int, rng: np.random.Generator,
                scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """An Inception-style crop box (top, left, height, width): area fraction in `scale`, aspect in
  `ratio`, torchvision's ten tries and central fallback. Needs only the image's size, so an
  encoded image is decoded after the box is known (`cnnjax.data.encoded.decode`)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback (as torchvision): the central crop with the aspect clamped into `ratio`.
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def fit_within(image: np.ndarray, limit: int, interpolation: str = "bilinear") -> np.ndarray:
  """`image` shrunk (aspect kept, antialiased) so that neither side is over `limit`."""
  height, width = image.shape[:2]
  if max(height, width) <= limit:
    return image
  scale = limit / max(height, width)
  return resize(np.ascontiguousarray(image),
                (max(1, min(limit, round(height * scale))), max(1, min(limit, round(width * scale)))),
                interpolation)


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: str = "bilinear") -> np.ndarray:
  """Inception-style crop: area fraction in `scale`, aspect in `ratio`, then resize."""
  top, left, h, w = sample_crop(image.shape[0], image.shape[1], rng, scale, ratio)
  return resize(image[top:top + h, left:left + w], (size, size), interpolation)


def pad_and_crop(image: np.ndarray, rng: np.random.Generator, size: int, padding: int,
                 interpolation: str = "bilinear") -> np.ndarray:
  """CIFAR-style: resize to `size`, zero-pad by `padding`, crop a random `size` window."""
  image = resize(image, (size, size), interpolation)
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  return padded[top:top + size, left:left + size]


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875,
                interpolation: str = "bilinear") -> np.ndarray:
  """Resize the shorter side to size / crop_fraction, then take the central size x size."""
  if not 0 < crop_fraction <= 1:
    raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
  height, width = image.shape[:2]
  short = max(size, int(math.floor(size / crop_fraction + 0.5)))
  scale = short / min(height, width)
  resized = resize(image, (max(size, round(height * scale)), max(size, round(width * scale))),
                   interpolation)
  top = (resized.shape[0] - size) // 2
  left = (resized.shape[1] - size) // 2
  return resized[top:top + size, left:left + size]


# -- RandAugment (Cubuk et al. 2020), magnitudes on the paper's 0..30 scale ----------------

_MAX_MAGNITUDE = 30.0


def _signed(level: float, rng: np.random.Generator) -> float:
  return level if rng.random() < 0.5 else -level


def _gray(image: Image.Image):
  # An int fillcolor fills only the first band of an RGB image: (128, 0, 0), a dark red.
  return 128 if image.mode == "L" else (128,) * len(image.getbands())


def _affine(image: Image.Image, matrix) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, matrix,
                         resample=Image.Resampling.BILINEAR, fillcolor=_gray(image))


def _op_table() -> dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]]:
  def enhance(kind):
    return lambda im, m, rng: kind(im).enhance(1.0 + _signed(0.9 * m, rng))

  return {
      "identity": lambda im, m, rng: im,
      "autocontrast": lambda im, m, rng: ImageOps.autocontrast(im),
      "equalize": lambda im, m, rng: ImageOps.equalize(im),
      "rotate": lambda im, m, rng: im.rotate(_signed(30.0 * m, rng),
                                             resample=Image.Resampling.BILINEAR,
                                             fillcolor=_gray(im)),
      "solarize": lambda im, m, rng: ImageOps.solarize(im, int(256 - 256 * m)),
      "posterize": lambda im, m, rng: ImageOps.posterize(im, max(1, int(round(8 - 4 * m)))),
      "color": enhance(ImageEnhance.Color),
      "contrast": enhance(ImageEnhance.Contrast),
      "brightness": enhance(ImageEnhance.Brightness),
      "sharpness": enhance(ImageEnhance.Sharpness),
      "shear_x": lambda im, m, rng: _affine(im, (1, _signed(0.3 * m, rng), 0, 0, 1, 0)),
      "shear_y": lambda im, m, rng: _affine(im, (1, 0, 0, _signed(0.3 * m, rng), 1, 0)),
      "translate_x": lambda im, m, rng: _affine(
          im, (1, 0, _signed(0.45 * m * im.size[0], rng), 0, 1, 0)),
      "translate_y": lambda im, m, rng: _affine(
          im, (1, 0, 0, 0, 1, _signed(0.45 * m * im.size[1], rng))),
  }


RAND_AUGMENT_OPS = _op_table()


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int,
                 magnitude: float) -> np.ndarray:
  """Applies `num_ops` uniformly chosen operations at `magnitude` (0..30)."""
  if not 0 <= magnitude <= _MAX_MAGNITUDE:
    raise ValueError(f"RandAugment magnitude must be in [0, {_MAX_MAGNITUDE:g}], got {magnitude}")
  names = list(RAND_AUGMENT_OPS)
  level = magnitude / _MAX_MAGNITUDE
  pil = _pil(image)
  for choice in rng.integers(0, len(names), size=num_ops):
    pil = RAND_AUGMENT_OPS[names[choice]](pil, level, rng)
  return _array(pil, image.shape[-1])


# -- the per-example pipeline ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """What turns a stored uint8 image into a model input, per example.

  `image_size`: the square output size. `channels`: 1 or 3 (grayscale is repeated to RGB, RGB
  reduced to luma). `mean`, `std`: per channel, on the 0..1 scale. `interpolation`:
  `bilinear`, `bicubic` or `nearest`. `train_crop`: `random_resized` (area in `crop_scale`),
  `pad_crop` (by `pad` pixels) or `resize`. `flip`: random horizontal flips.
  `rand_augment`: (N, M) or None. `crop_fraction`: evaluation's centre crop. `output`:
  `float32` (normalised here) or `uint8` (the step normalises). `host_stages`: `all`, or
  with the device augmenting, `crop` (the host only crops and resizes), `region` (it only
  crops: random_resized, the region at most `region_limit` a side) or `none` (it only
  decodes). `train(image, rng)` and `eval(image)` take uint8 HWC arrays, `train_encoded` and
  `eval_encoded` an image's encoded bytes; they return HWC arrays of `output`'s dtype, of
  `image_size` but for `region`'s and `none`'s training images. Bad values raise
  `ValueError` naming the valid ones.
  """

  image_size: int
  channels: int = 3
  mean: Sequence[float] = (0.485, 0.456, 0.406)
  std: Sequence[float] = (0.229, 0.224, 0.225)
  interpolation: str = "bilinear"
  train_crop: str = "random_resized"
  crop_scale: tuple[float, float] = (0.08, 1.0)
  pad: int = 4
  flip: bool = True
  rand_augment: tuple[int, float] | None = None
  crop_fraction: float = 0.875
  # "float32": normalised here. "uint8": the host stops after cropping and augmenting and the
  # batch leaves it as uint8, a quarter of the bytes; the training step normalises it with the
  # same mean and std (`cnnjax.train.steps.normalize`).
  output: str = "float32"
  host_stages: str = "all"

  def __post_init__(self):
    if self.image_size < 1:
      raise ValueError(f"image_size must be positive, got {self.image_size}")
    if self.train_crop not in TRAIN_CROPS:
      raise ValueError(f"train_crop must be one of {TRAIN_CROPS}, got {self.train_crop!r}")
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, "
                       f"got {self.interpolation!r}")
    if len(self.mean) != len(self.std):
      raise ValueError("mean and std need one value per channel")
    if self.output not in OUTPUTS:
      raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
    if self.host_stages not in HOST_STAGES:
      raise ValueError(f"host_stages must be one of {HOST_STAGES}, got {self.host_stages!r}")
    if self.host_stages != "all" and self.output != "uint8":
      raise ValueError("the device augments uint8 images: host_stages other than 'all' need "
                       "output='uint8'")
    if self.host_stages == "region" and self.train_crop != "random_resized":
      raise ValueError(f"host_stages='region' leaves the random resized crop's resize to the "
                       f"device; train_crop={self.train_crop!r} needs host_stages='crop'")

  @property
  def region_limit(self) -> int:
    """The largest side of a `region` training image: twice `image_size`. The DCT scale
    keeps a crop's shorter side under that (the next scale would take it below
    `image_size`), so only crops far from square are shrunk on the host to fit."""
    return 2 * self.image_size

  def _finish(self, image: np.ndarray) -> np.ndarray:
    if image.shape[-1] == 1 and self.channels == 3:
      image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 3 and self.channels == 1:
      image = np.round(image @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    if self.output == "uint8":
      # A view (a flip, RGBX's first three channels) stays one: np.stack copies it into the
      # batch anyway, and a copy here was a tenth of a JPEG crop's host time.
      return np.asarray(image, np.uint8)
    mean = np.asarray(self.mean, np.float32)[: image.shape[-1]]
    std = np.asarray(self.std, np.float32)[: image.shape[-1]]
    if len(self.mean) != image.shape[-1]:
      mean, std = np.resize(mean, image.shape[-1]), np.resize(std, image.shape[-1])
    if image.dtype != np.uint8:
      return ((image.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    # The same float32 arithmetic on the 256 values each channel can hold, then a lookup per
    # channel: bit-identical, and 2-3x faster than broadcasting over a last axis of 3 (2.7 ms
    # against 1.2 ms for 224x224x3; a flipped view 4.0 ms), a fifth of a RandAugment image's cost.
    table = (np.arange(256, dtype=np.float32)[None, :] / 255.0 - mean[:, None]) / std[:, None]
    out = np.empty(image.shape, np.float32)
    for channel in range(image.shape[-1]):
      np.take(table[channel], image[..., channel], out=out[..., channel])
    return out

  def train(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = self.image_size
    if self.host_stages == "none":
      return self._finish(image)
    if self.host_stages == "region":
      top, left, h, w = sample_crop(image.shape[0], image.shape[1], rng, self.crop_scale)
      return self._finish(fit_within(image[top:top + h, left:left + w], self.region_limit,
                                     self.interpolation))
    if self.train_crop == "random_resized":
      image = random_resized_crop(image, rng, size, self.crop_scale, interpolation=self.interpolation)
    elif self.train_crop == "pad_crop":
      image = pad_and_crop(image, rng, size, self.pad, self.interpolation)
    else:
      image = resize(image, (size, size), self.interpolation)
    return self._after_crop(image, rng)

  def train_encoded(self, encoded: bytes, rng: np.random.Generator) -> np.ndarray:
    """`train` from an encoded image, decoding only the crop at the smallest DCT scale that
    keeps it at least `image_size` (JPEG): the same random draws as `train` on the decoded
    image, the crop decoded at reduced size rather than resized from the full one."""
    size = self.image_size
    if self.host_stages == "none":
      return self._finish(encoded_lib.decode(encoded, self.channels))
    if self.train_crop != "random_resized":
      target = (size, size) if self.train_crop == "resize" else None
      return self.train(encoded_lib.decode(encoded, self.channels, target=target), rng)
    height, width = encoded_lib.size_of(encoded)
    box = sample_crop(height, width, rng, self.crop_scale)
    if self.host_stages == "region":
      region = encoded_lib.decode_region(encoded, self.channels, box, (size, size),
                                         full=(height, width))
      return self._finish(fit_within(region, self.region_limit, self.interpolation))
    image = encoded_lib.decode_resized(encoded, self.channels, box, (size, size),
                                       INTERPOLATIONS[self.interpolation],
                                       full=(height, width))
    return self._after_crop(image, rng)

  def _after_crop(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if self.host_stages == "crop":
      return self._finish(image)
    if self.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    if self.rand_augment is not None:
      image = rand_augment(np.ascontiguousarray(image), rng, *self.rand_augment)
    return self._finish(image)

  def eval_encoded(self, encoded: bytes) -> np.ndarray:
    """`eval` from an encoded image, decoded at the smallest DCT scale that still covers the
    resize `eval` makes (the centre crop's shorter side, or the whole image's)."""
    height, width = encoded_lib.size_of(encoded)
    if self.train_crop == "random_resized":
      short = max(self.image_size, int(math.floor(self.image_size / self.crop_fraction + 0.5)))
      target = (round(height * short / min(height, width)), round(width * short / min(height, width)))
    else:
      target = (self.image_size, self.image_size)
    # decode's target bounds the whole image here: no crop box, the full frame at >= target.
    return self.eval(encoded_lib.decode(encoded, self.channels, target=target))

  def eval(self, image: np.ndarray) -> np.ndarray:
    if self.train_crop == "random_resized":
      image = center_crop(image, self.image_size, self.crop_fraction, self.interpolation)
    else:  # the training crop sees the whole image, so evaluation does too
      image = resize(image, (self.image_size, self.image_size), self.interpolation)
    return self._finish(image)
