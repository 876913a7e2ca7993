"""Images kept as their encoded bytes: read without TFDS's decoding, decoded only as needed.

A prepared dataset stores each image's file bytes (a folder's JPEGs stay those
JPEGs; TFDS's imagenet2012 stores JPEG too). `DecodingSource` reads a split
with TFDS's image decoding skipped: `source[i]` still gives a decoded uint8
image, and `read_encoded(keys)` gives the bytes to a caller that decodes only
what it uses. `decode` does that: with the crop box in full-size pixels and
the size the crop will be resized to, a JPEG is decoded at the smallest DCT
scale (1/2, 1/4 or 1/8: PIL's `draft`) that keeps the crop at least that
size, and only then cropped. A 500x375 photo cropped to 224 px decodes at
1/2 its size or less, a quarter of the pixels.

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
from PIL import Image, UnidentifiedImageError


class CorruptImageError(ValueError):
  """A file that cannot be decoded as an image."""


def _mode(channels: int) -> str:
  return "L" if channels == 1 else "RGB"


def _as_array(image: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(image.convert(_mode(channels)))
  return array[..., None] if array.ndim == 2 else array


def size_of(encoded: bytes) -> tuple[int, int]:
  """(height, width) from the header alone."""
  with Image.open(io.BytesIO(encoded)) as image:
    return image.size[1], image.size[0]


def decode(encoded: bytes, channels: int = 3,
           crop: tuple[int, int, int, int] | None = None,
           target: tuple[int, int] | None = None) -> np.ndarray:
  """uint8 HWC with `channels` channels; `crop` (top, left, height, width) in full-size pixels.

  With `target` (the size the crop is resized to next), a JPEG decodes at the smallest DCT
  scale that keeps the crop at least `target`, and the crop box is scaled with it.
  """
  with Image.open(io.BytesIO(encoded)) as image:
    full_width, full_height = image.size
    top, left, height, width = crop if crop is not None else (0, 0, full_height, full_width)
    if target is not None and image.format == "JPEG":
      shrink = min(height / target[0], width / target[1])
      if shrink >= 2:
        # draft picks the largest DCT scale whose result is still at least this size.
        image.draft(_mode(channels), (math.ceil(full_width / shrink),
                                      math.ceil(full_height / shrink)))
    scale_x, scale_y = image.size[0] / full_width, image.size[1] / full_height
    if crop is not None:
      box = (int(math.floor(left * scale_x)), int(math.floor(top * scale_y)),
             max(int(math.floor(left * scale_x)) + 1, int(round((left + width) * scale_x))),
             max(int(math.floor(top * scale_y)) + 1, int(round((top + height) * scale_y))))
      image = image.crop(box)
    return _as_array(image, channels)


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
