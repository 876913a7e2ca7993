"""Images kept as their encoded bytes: read without TFDS's decoding, decoded only as needed.

A prepared dataset stores each image's file bytes (a folder's JPEGs stay those
JPEGs; TFDS's imagenet2012 stores JPEG too). `DecodingSource` reads a split
with TFDS's image decoding skipped: `source[i]` still gives a decoded uint8
image, and `read_encoded(keys)` gives the bytes to a caller that decodes only
what it uses. `decode` does that: with the crop box in full-size pixels and
the size the crop will be resized to, a JPEG is decoded at the smallest DCT
scale (1/2, 1/4 or 1/8) that keeps the crop at least that size, and only then
cropped. A 500x375 photo cropped to 224 px decodes at 1/2 its size or less, a
quarter of the pixels. JPEGs decode with libjpeg-turbo through simplejpeg
(fast DCT and upsampling: 0.55 ms against PIL's 1.06 ms for a 500x375 photo
at 1/2 scale, on a Sapphire Rapids core); what it refuses (CMYK, arithmetic
coding) and other formats go through PIL. `decode_region` stops after the
crop, for the device to resize (`data.augment_on = "device"`): the host then
spends its time on the entropy decoding alone (0.72 ms against 1.72 ms with
the resize, the benchmark's photos, on an AMD EPYC core).

`verify` decodes a file the cheapest way that still reads all of its data
(at 1/8 scale), so that preparation names a corrupt or truncated image before
anything is written.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError


class CorruptImageError(ValueError):
  """A file that cannot be decoded as an image."""


def _mode(channels: int) -> str:
  return "L" if channels == 1 else "RGB"


def _as_array(image: Image.Image, channels: int) -> np.ndarray:
  if image.mode == "RGBX" and channels == 3:
    return np.asarray(image)[..., :3]
  array = np.asarray(image.convert(_mode(channels)))
  return array[..., None] if array.ndim == 2 else array


def _is_jpeg(encoded: bytes) -> bool:
  return encoded[:3] == b"\xff\xd8\xff"


def size_of(encoded: bytes) -> tuple[int, int]:
  """(height, width) from the header alone."""
  if _is_jpeg(encoded):
    try:
      height, width, _, _ = simplejpeg.decode_jpeg_header(encoded)
      return height, width
    except ValueError:
      pass  # a JPEG that libjpeg-turbo's header reader refuses: PIL may still read it
  with Image.open(io.BytesIO(encoded)) as image:
    return image.size[1], image.size[0]


def _dct_shrink(crop_size: tuple[int, int], target: tuple[int, int] | None) -> int:
  """The largest of 1, 2, 4, 8 that keeps a crop of `crop_size` at least `target`. Only
  these: libjpeg-turbo's other scales (5/8, 3/4...) decode slower than the full image."""
  if target is None:
    return 1
  shrink = min(crop_size[0] / target[0], crop_size[1] / target[1])
  return max((f for f in (1, 2, 4, 8) if f <= shrink), default=1)


def _libjpeg_turbo(encoded: bytes, colorspace: str, shrink: int,
                   full: tuple[int, int]) -> np.ndarray | None:
  """A JPEG decoded by simplejpeg at 1/`shrink` of its size (fast DCT and upsampling), or
  None for what it refuses (CMYK, arithmetic coding, damaged but readable: PIL decodes
  those) and for other formats."""
  if not _is_jpeg(encoded):
    return None
  try:
    return simplejpeg.decode_jpeg(encoded, colorspace=colorspace, fastdct=True,
                                  fastupsample=True, min_height=math.ceil(full[0] / shrink),
                                  min_width=math.ceil(full[1] / shrink))
  except ValueError:
    return None


def _decode_full(encoded: bytes, channels: int, shrink: int,
                 full: tuple[int, int]) -> Image.Image:
  """The whole image decoded at 1/`shrink` of its size (a JPEG's DCT scaling; other
  formats at full size), as a PIL image for the crop-and-resize that follows."""
  # RGBX: PIL's own layout for RGB, so the pixels are wrapped, not copied.
  mode = "L" if channels == 1 else "RGBX"
  array = _libjpeg_turbo(encoded, "GRAY" if channels == 1 else "RGBX", shrink, full)
  if array is not None:
    return Image.frombuffer(mode, (array.shape[1], array.shape[0]), array, "raw", mode, 0, 1)
  image = Image.open(io.BytesIO(encoded))
  if shrink > 1 and image.format == "JPEG":
    full_width, full_height = image.size
    image.draft(_mode(channels), (math.ceil(full_width / shrink), math.ceil(full_height / shrink)))
  return image.convert(_mode(channels))


def _pixel_box(crop, full: tuple[int, int], decoded: tuple[int, int]) -> tuple[int, ...]:
  """The crop box (top, left, height, width), given in full-size pixels, as (left, top,
  right, bottom) in whole pixels of the image decoded at `decoded` (height, width): the
  resize that follows then sees no pixel outside the box, as torchvision's crop-then-resize
  does not."""
  top, left, height, width = crop
  scale_y, scale_x = decoded[0] / full[0], decoded[1] / full[1]
  left_px, top_px = int(math.floor(left * scale_x)), int(math.floor(top * scale_y))
  return (left_px, top_px, max(left_px + 1, int(round((left + width) * scale_x))),
          max(top_px + 1, int(round((top + height) * scale_y))))


def _cropped(image: Image.Image, crop, full: tuple[int, int]) -> Image.Image:
  """The crop box, given in full-size pixels, of an image decoded at a reduced scale."""
  return image.crop(_pixel_box(crop, full, (image.size[1], image.size[0])))


def decode(encoded: bytes, channels: int = 3,
           crop: tuple[int, int, int, int] | None = None,
           target: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 HWC with `channels` channels; `crop` (top, left, height, width) in full-size pixels.

  With `target` (the size the crop is resized to next), a JPEG decodes at the smallest DCT
  scale that keeps the crop at least `target`, and the crop box is scaled with it.
  """
  full = size_of(encoded)
  box = crop if crop is not None else (0, 0, *full)
  image = _decode_full(encoded, channels, _dct_shrink(box[2:], target), full)
  if crop is not None:
    image = _cropped(image, crop, full)
  return _as_array(image, channels)


def decode_resized(encoded: bytes, channels: int, crop: tuple[int, int, int, int],
                   size: tuple[int, int], resample=Image.Resampling.BILINEAR,
                   full: tuple[int, int] | None = None) -> np.ndarray:
  """The crop (top, left, height, width, full-size pixels) decoded at the smallest DCT scale
  that keeps it at least `size`, then resized to `size` (antialiased), all in PIL: no
  array in between. `full`: the image's (height, width), where the caller read it already."""
  full = full or size_of(encoded)
  image = _cropped(_decode_full(encoded, channels, _dct_shrink(crop[2:], size), full), crop,
                   full)
  if image.size != (size[1], size[0]):
    image = image.resize((size[1], size[0]), resample)
  return _as_array(image, channels)


def _decode_array(encoded: bytes, channels: int, shrink: int,
                  full: tuple[int, int]) -> np.ndarray:
  """`_decode_full` as a uint8 HWC array: a JPEG straight from libjpeg-turbo in `channels`
  channels (RGB, not RGBX: no fourth byte to skip when the crop is copied out)."""
  array = _libjpeg_turbo(encoded, "GRAY" if channels == 1 else "RGB", shrink, full)
  if array is None:
    return _as_array(_decode_full(encoded, channels, shrink, full), channels)
  return array if array.ndim == 3 else array[..., None]


def decode_region(encoded: bytes, channels: int, crop: tuple[int, int, int, int],
                  size: tuple[int, int], full: tuple[int, int] | None = None) -> np.ndarray:
  """The crop (top, left, height, width, full-size pixels) at the smallest DCT scale that
  keeps it at least `size`, not resized: a view of the decoded image, for the device to
  resize (`data.augment_on = "device"`). `full`: the image's (height, width), where the
  caller read it already."""
  full = full or size_of(encoded)
  image = _decode_array(encoded, channels, _dct_shrink(crop[2:], size), full)
  left, top, right, bottom = _pixel_box(crop, full, image.shape[:2])
  return image[top:bottom, left:right]


def verify(encoded: bytes, name: str) -> None:
  """Raises `CorruptImageError` naming `name` unless all of `encoded` decodes."""
  try:
    with Image.open(io.BytesIO(encoded)) as image:
      image.draft("RGB", (1, 1))  # the smallest DCT scale: every byte read, few pixels made
      image.load()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
    raise CorruptImageError(f"{name} is not a readable image ({error}); remove or replace it, "
                            "then prepare again") from None


class DecodingSource:
  """A random-access TFDS source read with its image decoding skipped (see module doc)."""

  def __init__(self, encoded_source, channels: int):
    self.encoded_source = encoded_source
    self.channels = channels

  def __len__(self) -> int:
    return len(self.encoded_source)

  def read_encoded(self, keys: Sequence[int]) -> list[dict[str, Any]]:
    from cnnjax.data.datasets import read_examples  # noqa: PLC0415

    return read_examples(self.encoded_source, keys)

  def _decoded(self, example: dict) -> dict:
    return {**example, "image": decode(example["image"], self.channels)}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._decoded(self.encoded_source[int(index)])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self._decoded(e) for e in self.read_encoded(indices)]
