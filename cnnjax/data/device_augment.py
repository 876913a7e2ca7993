"""Augmentation inside the jitted training step (`config.data.augment_on = "device"`).

The host's per-example transforms (`cnnjax.data.preprocess`) as batched JAX:
Inception-style random resized crop, CIFAR-style pad-and-crop or a plain
resize, horizontal flip, RandAugment(N, M) with the host's fourteen PIL
operations, normalisation; and the recipes that act on a batch or on
normalised pixels, which run in the step whatever `augment_on` says: mixup
and cutmix (timm's conventions: `mixup_alpha`, `cutmix_alpha`, `mix_prob`,
`switch_prob`, one mixing per batch with the batch reversed) and random
erasing (timm's `RandomErasing`, after normalisation).

Everything random comes from one key: the step's (`fold_in(state.rng, step)`),
split per example by position in the global batch. A resumed run therefore
augments exactly as an uninterrupted one. Images arrive as uint8: the stored
image (a "canvas" of one fixed size, from which the crop is sampled here), the
host's crop not yet resized (`crop="region"`: in the top-left corner of a
canvas, its height and width beside it), or the host's crop already resized
(`crop="none"`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from cnnjax.registry import IMAGENET_MEAN, IMAGENET_STD

CROPS = ("random_resized", "pad_crop", "resize", "region", "none")
ERASE_MODES = ("pixel", "const", "rand")
PLACES = ("host", "device")
_MAX_MAGNITUDE = 30.0
# The host's operations, in the host's order (`preprocess.RAND_AUGMENT_OPS`).
RAND_AUGMENT_OPS = ("identity", "autocontrast", "equalize", "rotate", "solarize", "posterize",
                    "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
                    "translate_x", "translate_y")
_FILL = 128.0  # PIL's fillcolor in the host's geometric operations


def check_recipe(*, mixup_alpha: float, cutmix_alpha: float, mix_prob: float,
                 switch_prob: float, erase_prob: float, erase_mode: str) -> None:
  """`ValueError` naming the `config.data` key and its valid values for a bad mixup, cutmix
  or random-erasing setting (the config is checked with it before anything is built)."""
  for name, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f"config.data.{name} must be 0 (off) or a positive Beta(alpha, alpha) "
                       f"parameter such as 0.2 or 1.0, got {value}")
  for name, value in (("mix_prob", mix_prob), ("switch_prob", switch_prob),
                      ("erase_prob", erase_prob)):
    if not 0 <= value <= 1:
      raise ValueError(f"config.data.{name} must be a probability in [0, 1], got {value}")
  if erase_mode not in ERASE_MODES:
    raise ValueError(f"config.data.erase_mode must be one of {ERASE_MODES}, got {erase_mode!r}")


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
  """What the step does to a uint8 batch before the model sees it.

  `image_size`: the model's input size. `crop`: `random_resized` (area in `crop_scale`,
  aspect in `crop_ratio`), `pad_crop` (by `pad`), `resize`, `region` (the host cropped, the
  step resizes the region it gives) or `none` (the host cropped and resized).
  `flip`, `rand_augment` ((N, M) or None), `mean` and `std` as in `Preprocessing`.
  `mixup_alpha`, `cutmix_alpha` (0: off), `mix_prob`, `switch_prob`: timm's mixing.
  `erase_prob`, `erase_mode` (`pixel`, `const`, `rand`): timm's random erasing. Bad values
  raise `ValueError` naming the valid ones; `check_input` refuses images smaller than the
  crop.
  """

  image_size: int
  crop: str = "random_resized"
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  pad: int = 4
  flip: bool = True
  rand_augment: tuple[int, float] | None = None
  mean: Sequence[float] = IMAGENET_MEAN
  std: Sequence[float] = IMAGENET_STD
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_prob: float = 1.0
  switch_prob: float = 0.5
  erase_prob: float = 0.0
  erase_mode: str = "pixel"

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"the device crop must be one of {CROPS}, got {self.crop!r}")
    check_recipe(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha,
                 mix_prob=self.mix_prob, switch_prob=self.switch_prob,
                 erase_prob=self.erase_prob, erase_mode=self.erase_mode)
    if self.rand_augment is not None and not 0 <= self.rand_augment[1] <= _MAX_MAGNITUDE:
      raise ValueError(f"RandAugment magnitude must be in [0, {_MAX_MAGNITUDE:g}], "
                       f"got {self.rand_augment[1]}")

  @property
  def mixes(self) -> bool:
    return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

  def check_input(self, shape: Sequence[int]) -> None:
    """An error naming both sizes where images of `shape` (H, W, C) cannot give the crop."""
    height, width = shape[:2]
    if self.crop == "none" and (height, width) != (self.image_size, self.image_size):
      raise ValueError(f"the host sends {height}x{width} crops but the model takes "
                       f"{self.image_size}x{self.image_size}")
    if self.crop == "random_resized" and min(height, width) < self.image_size:
      raise ValueError(
          f"device augmentation crops {self.image_size}x{self.image_size} from images of "
          f"{height}x{width}, which are smaller than the crop; store the images at "
          f">= {self.image_size} px, lower config.data.image_size, or set "
          "config.data.augment_on='host'")


# -- geometry -------------------------------------------------------------------------------


def sample_crop(key: jax.Array, height: int, width: int,
                scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """(top, left, h, w) as int32: `preprocess.sample_crop`'s rule (ten tries, then the central
  crop with the aspect clamped into `ratio`), drawn from `key`."""
  area_key, aspect_key, top_key, left_key = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(area_key, (10,), minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(aspect_key, (10,), minval=math.log(ratio[0]),
                                      maxval=math.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fallback_h, fallback_w = int(round(width / ratio[0])), width
  elif in_ratio > ratio[1]:
    fallback_h, fallback_w = height, int(round(height * ratio[1]))
  else:
    fallback_h, fallback_w = height, width
  found = fits[first]
  h = jnp.where(found, h[first], fallback_h)
  w = jnp.where(found, w[first], fallback_w)
  top = jnp.where(found, jnp.floor(jax.random.uniform(top_key) * (height - h + 1)),
                  (height - h) // 2).astype(jnp.int32)
  left = jnp.where(found, jnp.floor(jax.random.uniform(left_key) * (width - w + 1)),
                   (width - w) // 2).astype(jnp.int32)
  return jnp.stack([top, left, h, w])


def resize_box(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """The box (top, left, h, w) of a float HWC image resized to size x size: bilinear,
  antialiased when shrinking (PIL's filter), rounded to uint8 levels as the host's is."""
  top, left, h, w = (box[i].astype(jnp.float32) for i in range(4))
  scale = jnp.stack([size / h, size / w])
  translation = jnp.stack([-top * size / h, -left * size / w])
  out = jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale,
                                      translation, method="linear", antialias=True)
  return jnp.clip(jnp.round(out), 0, 255)


def random_resized_crop(key, image, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  box = sample_crop(key, image.shape[0], image.shape[1], scale, ratio)
  return resize_box(image, box, size)


def pad_and_crop(key, image, size, padding):
  if image.shape[:2] != (size, size):
    image = resize_box(image, jnp.asarray([0, 0, image.shape[0], image.shape[1]]), size)
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = jax.random.randint(key, (2,), 0, 2 * padding + 1)
  return jax.lax.dynamic_slice(padded, (top, left, 0), (size, size, image.shape[-1]))


def _affine(image: jax.Array, matrix) -> jax.Array:
  """PIL's `Image.transform(AFFINE, matrix, BILINEAR, fillcolor=128)`: output pixel (x, y)
  samples the input at (a x + b y + c, d x + e y + f), pixel centres at +0.5."""
  a, b, c, d, e, f = matrix
  height, width = image.shape[:2]
  ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                        jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij")
  source_x = a * xs + b * ys + c
  source_y = d * xs + e * ys + f
  inside = (source_x >= 0) & (source_x < width) & (source_y >= 0) & (source_y < height)
  sampled = jnp.stack([jax.scipy.ndimage.map_coordinates(
      image[..., ch], [source_y - 0.5, source_x - 0.5], order=1, mode="nearest")
      for ch in range(image.shape[-1])], axis=-1)
  return jnp.where(inside[..., None], jnp.floor(sampled), _FILL)


def _rotation(degrees, width, height):
  """PIL's `rotate` matrix (counter-clockwise by `degrees` about the centre)."""
  angle = -jnp.deg2rad(degrees)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = width / 2.0, height / 2.0
  return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


# -- RandAugment: the host's PIL operations on float images holding uint8 levels ------------


def _luma(image):
  """PIL's RGB -> L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16."""
  if image.shape[-1] == 1:
    return image[..., 0]
  r, g, b = (image[..., i].astype(jnp.int32) for i in range(3))
  return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(jnp.float32)


def _blend(degenerate, image, factor):
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped to uint8 and
  truncated, as PIL's `blend` does."""
  return jnp.clip(jnp.floor(degenerate + factor * (image - degenerate)), 0, 255)


def _autocontrast(image):
  low = image.min(axis=(0, 1), keepdims=True)
  high = image.max(axis=(0, 1), keepdims=True)
  scale = 255.0 / jnp.maximum(high - low, 1.0)
  stretched = jnp.clip(jnp.floor((image - low) * scale), 0, 255)
  return jnp.where(high > low, stretched, image)


def _equalize_channel(channel):
  levels = channel.astype(jnp.int32)
  histogram = jnp.zeros(256, jnp.int32).at[levels.ravel()].add(1)
  last = histogram[levels.max()]
  step = (histogram.sum() - last) // 255
  cumulative = jnp.cumsum(histogram) - histogram
  lut = jnp.minimum((step // 2 + cumulative) // jnp.maximum(step, 1), 255)
  return jnp.where(step > 0, lut[levels].astype(jnp.float32), channel)


def _equalize(image):
  return jnp.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], -1)


def _smooth(image):
  """PIL's SMOOTH filter (3x3, centre 5, total 13), the border rows and columns kept."""
  kernel = jnp.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], jnp.float32) / 13.0
  inner = jnp.stack([jax.scipy.signal.convolve2d(image[..., c], kernel, mode="valid")
                     for c in range(image.shape[-1])], -1)
  return image.at[1:-1, 1:-1].set(jnp.clip(jnp.round(inner), 0, 255))


def apply_op(image: jax.Array, op: jax.Array, level: float, sign: jax.Array) -> jax.Array:
  """RandAugment operation number `op` (of `RAND_AUGMENT_OPS`) at `level` (magnitude / 30),
  with `sign` (+1 or -1) for the signed ones: what `preprocess.RAND_AUGMENT_OPS` does."""
  height, width = image.shape[:2]
  signed = sign * level

  def enhance(degenerate):
    return lambda im: _blend(degenerate(im), im, 1.0 + 0.9 * signed)

  gray = lambda im: jnp.broadcast_to(_luma(im)[..., None], im.shape)  # noqa: E731
  mean_gray = lambda im: jnp.full_like(im, jnp.floor(_luma(im).mean() + 0.5))  # noqa: E731
  solarize_at = int(256 - 256 * level)
  posterize_bits = max(1, int(round(8 - 4 * level)))
  posterize_mask = 256 - 2 ** (8 - posterize_bits)
  branches = [
      lambda im: im,
      _autocontrast,
      _equalize,
      lambda im: _affine(im, _rotation(30.0 * signed, width, height)),
      lambda im: jnp.where(im >= solarize_at, 255.0 - im, im),
      lambda im: (im.astype(jnp.int32) & posterize_mask).astype(jnp.float32),
      enhance(gray),
      enhance(mean_gray),
      enhance(jnp.zeros_like),
      enhance(_smooth),
      lambda im: _affine(im, (1.0, 0.3 * signed, 0.0, 0.0, 1.0, 0.0)),
      lambda im: _affine(im, (1.0, 0.0, 0.0, 0.3 * signed, 1.0, 0.0)),
      lambda im: _affine(im, (1.0, 0.0, 0.45 * signed * width, 0.0, 1.0, 0.0)),
      lambda im: _affine(im, (1.0, 0.0, 0.0, 0.0, 1.0, 0.45 * signed * height)),
  ]
  return jax.lax.switch(op, branches, image)


def rand_augment_choices(key: jax.Array, num_ops: int) -> tuple[jax.Array, jax.Array]:
  """(operation numbers, signs) of one example: uniform over the 14, sign +-1 evenly."""
  op_key, sign_key = jax.random.split(key)
  ops = jax.random.randint(op_key, (num_ops,), 0, len(RAND_AUGMENT_OPS))
  signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (num_ops,)), 1.0, -1.0)
  return ops, signs


def rand_augment(key, image, num_ops: int, magnitude: float):
  ops, signs = rand_augment_choices(key, num_ops)
  for i in range(num_ops):
    image = apply_op(image, ops[i], magnitude / _MAX_MAGNITUDE, signs[i])
  return image


# -- batch recipes: random erasing, mixup, cutmix -------------------------------------------


def erase_box(key, height: int, width: int, min_area=0.02, max_area=1 / 3,
              min_aspect=0.3) -> jax.Array:
  """timm's RandomErasing box (top, left, h, w): ten tries at an area in [min_area, max_area]
  and a log-uniform aspect; h = w = 0 when none fits (nothing erased)."""
  area_key, aspect_key, top_key, left_key = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(area_key, (10,), minval=min_area, maxval=max_area)
  aspect = jnp.exp(jax.random.uniform(aspect_key, (10,), minval=math.log(min_aspect),
                                      maxval=math.log(1 / min_aspect)))
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w < width) & (h < height)
  first = jnp.argmax(fits)
  h, w = jnp.where(fits[first], h[first], 0), jnp.where(fits[first], w[first], 0)
  top = jnp.floor(jax.random.uniform(top_key) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(left_key) * (width - w + 1)).astype(jnp.int32)
  return jnp.stack([top, left, h, w])


def random_erase(key, image, probability: float, mode: str):
  """One box of a normalised image replaced: per-pixel normal noise ("pixel", timm's
  default in training), zeros ("const", the mean) or one normal colour ("rand")."""
  apply_key, box_key, noise_key = jax.random.split(key, 3)
  height, width, channels = image.shape
  top, left, h, w = erase_box(box_key, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  inside &= jax.random.bernoulli(apply_key, probability)
  if mode == "pixel":
    fill = jax.random.normal(noise_key, image.shape, image.dtype)
  elif mode == "rand":
    fill = jnp.broadcast_to(jax.random.normal(noise_key, (channels,), image.dtype), image.shape)
  else:
    fill = jnp.zeros_like(image)
  return jnp.where(inside[..., None], fill, image)


class Mixing(NamedTuple):
  """A batch mixed with itself reversed: targets are lam * y + (1 - lam) * y[::-1]."""

  lam: jax.Array
  used_cutmix: jax.Array


def cutmix_box(key, lam, height: int, width: int) -> jax.Array:
  """timm's `rand_bbox`: a box of (1 - lam) of the area, centred uniformly, clipped."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h, cut_w = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
  y_key, x_key = jax.random.split(key)
  cy = jax.random.randint(y_key, (), 0, height)
  cx = jax.random.randint(x_key, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return jnp.stack([top, bottom, left, right])


def mix(key, images: jax.Array, config: DeviceAugment) -> tuple[jax.Array, Mixing]:
  """timm's `Mixup` in batch mode: with probability `mix_prob`, cutmix (probability
  `switch_prob` when both are on) or mixup, one lam for the batch; cutmix's lam is
  corrected to the box actually pasted."""
  apply_key, switch_key, mixup_key, cutmix_key, box_key = jax.random.split(key, 5)
  both = config.mixup_alpha > 0 and config.cutmix_alpha > 0
  if both:
    use_cutmix = jax.random.bernoulli(switch_key, config.switch_prob)
  else:
    use_cutmix = jnp.asarray(config.cutmix_alpha > 0)
  mixup_lam = (jax.random.beta(mixup_key, config.mixup_alpha, config.mixup_alpha)
               if config.mixup_alpha > 0 else jnp.float32(1.0))
  cutmix_lam = (jax.random.beta(cutmix_key, config.cutmix_alpha, config.cutmix_alpha)
                if config.cutmix_alpha > 0 else jnp.float32(1.0))
  apply = jax.random.bernoulli(apply_key, config.mix_prob)
  height, width = images.shape[1:3]
  top, bottom, left, right = cutmix_box(box_key, cutmix_lam, height, width)
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  box_lam = 1.0 - ((bottom - top) * (right - left)) / (height * width)
  lam = jnp.where(use_cutmix, box_lam, mixup_lam).astype(jnp.float32)
  lam = jnp.where(apply, lam, 1.0)
  reversed_images = images[::-1]
  cut = jnp.where(in_box[None, :, :, None], reversed_images, images)
  blended = lam * images + (1.0 - lam) * reversed_images
  mixed = jnp.where(apply, jnp.where(use_cutmix, cut, blended), images)
  return mixed, Mixing(lam=lam, used_cutmix=apply & use_cutmix)


# -- the whole step-side pipeline -----------------------------------------------------------


def augment_example(key, image: jax.Array, config: DeviceAugment,
                    region: jax.Array | None = None) -> jax.Array:
  """One uint8 HWC image to the normalised float32 input: crop, flip, RandAugment,
  normalisation, random erasing. `region`: (height, width) of the host's crop in the
  image's top-left corner, for `crop="region"`."""
  crop_key, flip_key, rand_key, erase_key = jax.random.split(key, 4)
  image = image.astype(jnp.float32)
  size = config.image_size
  if config.crop == "region":
    if region is None:
      raise ValueError("crop='region' needs each example's region (height, width): the "
                       "batch's 'region' from a pipeline with host_stages='region'")
    image = resize_box(image, jnp.stack([0, 0, region[0], region[1]]), size)
  elif config.crop == "random_resized":
    image = random_resized_crop(crop_key, image, size, config.crop_scale, config.crop_ratio)
  elif config.crop == "pad_crop":
    image = pad_and_crop(crop_key, image, size, config.pad)
  elif config.crop == "resize" and image.shape[:2] != (size, size):
    image = resize_box(image, jnp.asarray([0, 0, image.shape[0], image.shape[1]]), size)
  if config.flip:
    image = jnp.where(jax.random.bernoulli(flip_key, 0.5), image[:, ::-1], image)
  if config.rand_augment is not None:
    image = rand_augment(rand_key, image, *config.rand_augment)
  channels = image.shape[-1]
  mean = jnp.resize(jnp.asarray(config.mean, jnp.float32), channels)
  std = jnp.resize(jnp.asarray(config.std, jnp.float32), channels)
  image = (image / 255.0 - mean) / std
  if config.erase_prob > 0:
    image = random_erase(erase_key, image, config.erase_prob, config.erase_mode)
  return image


def augment_batch(key: jax.Array, images: jax.Array, config: DeviceAugment,
                  regions: jax.Array | None = None) -> tuple[jax.Array, Mixing | None]:
  """A uint8 NHWC batch augmented per example (keys split from `key` by position), then
  mixed when mixup or cutmix is on. `regions`: (N, 2) for `crop="region"`. Returns the
  float32 inputs and the mixing (or None)."""
  example_key, mix_key = jax.random.split(key)
  keys = jax.random.split(example_key, images.shape[0])
  # `regions` None is an empty tree: vmap maps nothing of it.
  out = jax.vmap(lambda k, image, region: augment_example(k, image, config, region))(
      keys, images, regions)
  if not config.mixes:
    return out, None
  return mix(mix_key, out, config)
