"""A folder of images in class subfolders, prepared as a TFDS dataset.

Layout: `root/<split>/<class>/<image>` (splits such as train/test), or
`root/<class>/<image>` for a single `train` split. Classes are the sorted
union of class folder names. Each image is stored as its file's bytes, as
they are: a JPEG stays that JPEG (no re-encoding; `cnnjax.data.encoded`
decodes it, only the crop a step needs and at reduced size), so preparing
indexes and copies, and the prepared copy is about the folder's size. Every
file is decoded once first (at 1/8 scale for JPEG): a corrupt or truncated
image stops the preparation with its path, before anything is written.
The prepared copy lives under `data_dir/cnnjax_image_folder/<name>-<hash>/`,
keyed by the folder's absolute path; it is never overwritten — move it aside
to prepare a changed folder again. Version 1.0.0 stored PNG re-encodings; a
folder prepared so stays where it is, and 2.0.0 is prepared beside it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import pathlib
import re

import tensorflow_datasets as tfds

from cnnjax.data import encoded
from cnnjax.data.builders import Offline

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _is_class_dir(path: pathlib.Path) -> bool:
  return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir())


def scan(root: pathlib.Path) -> tuple[dict[str, list[tuple[pathlib.Path, str]]], list[str]]:
  """{split: [(image path, class name)]} and the sorted class names."""
  if not root.is_dir():
    raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
  children = sorted(p for p in root.iterdir() if p.is_dir())
  if children and all(_is_class_dir(c) for c in children):
    layout = {"train": children}
  else:
    layout = {split.name: sorted(c for c in split.iterdir() if _is_class_dir(c)) for split in children}
    layout = {split: dirs for split, dirs in layout.items() if dirs}
  if not layout:
    raise FileNotFoundError(
        f"no images found in {root}: expected root/<class>/<image> or root/<split>/<class>/<image> "
        f"with suffixes {sorted(IMAGE_SUFFIXES)}")
  classes = sorted({d.name for dirs in layout.values() for d in dirs})
  examples = {split: [(image, d.name) for d in dirs for image in sorted(d.iterdir())
                      if image.suffix.lower() in IMAGE_SUFFIXES]
              for split, dirs in layout.items()}
  return examples, classes


@dataclasses.dataclass
class ImageFolderConfig(tfds.core.BuilderConfig):
  root: str = ""


class CnnjaxImageFolder(Offline, tfds.core.GeneratorBasedBuilder):
  """Images in class subfolders."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"2.0.0": "the files' own bytes, not PNG re-encodings",
                   "1.0.0": "PNG re-encodings"}

  @functools.cached_property
  def _scanned(self):
    return scan(pathlib.Path(self.builder_config.root))

  def _info(self) -> tfds.core.DatasetInfo:
    _, classes = self._scanned
    return self.dataset_info_from_configs(
        description=f"images from {self.builder_config.root}",
        features=tfds.features.FeaturesDict({
            # No encoding format: the files' own (JPEG, PNG, ...), stored as they are.
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=classes)}),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    examples, classes = self._scanned
    for items in examples.values():  # all of them before the first write
      for path, _ in items:
        encoded.verify(path.read_bytes(), str(path))
    index = {name: i for i, name in enumerate(classes)}
    return {split: self._generate_examples(items, index) for split, items in examples.items()}

  def _generate_examples(self, items, index):
    for path, class_name in items:
      yield str(path), {"image": path.read_bytes(), "label": index[class_name]}


def config_name(root: pathlib.Path) -> str:
  digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
  stem = re.sub(r"[^A-Za-z0-9_.-]", "_", root.name)[:40] or "root"
  return f"{stem}-{digest}"


def folder_builder(root: str, data_dir: pathlib.Path) -> CnnjaxImageFolder:
  root_path = pathlib.Path(root).expanduser().absolute()
  config = ImageFolderConfig(name=config_name(root_path), root=str(root_path),
                             description=f"images from {root_path}")
  return CnnjaxImageFolder(config=config, data_dir=str(data_dir), file_format="array_record")
