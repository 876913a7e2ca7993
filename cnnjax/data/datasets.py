"""Finding, preparing and opening datasets by name, without TensorFlow.

A dataset is named like TFDS names it (`cifar10`, `gratings/64px`), or is a
folder of images given as `folder:/path/to/root` (see `image_folder`). The
embedded datasets (`builders.EMBEDDED`) are prepared as array_record on first
use; catalog datasets must have been prepared in array_record form beforehand,
and a missing one fails at once with the command that prepares it. Nothing
here touches the network or deletes prepared data.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from cnnjax.data import encoded

DATA_DIR_ENV = "CNNJAX_DATA_DIR"
FOLDER_PREFIX = "folder:"


class DatasetError(ValueError):
  """A dataset cannot be found, prepared or read; the message says how to fix it."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """`data_dir`, else `$CNNJAX_DATA_DIR`, else `~/tensorflow_datasets`."""
  chosen = data_dir or os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
  return pathlib.Path(chosen).expanduser().absolute()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a prepared dataset holds: its `name`, `num_classes`, `image_shape` ((height, width,
  channels), None where images vary), `splits` (name -> number of examples) and
  `class_names`."""

  name: str
  num_classes: int
  image_shape: tuple  # (height, width, channels); None for variable sizes
  splits: dict  # split name -> number of examples
  class_names: tuple = ()


def _quiet_tfds() -> None:
  """Installs `_NoOpenCVAdvice` on absl's logger, where TFDS warns (once per process)."""
  import logging  # noqa: PLC0415

  logger = logging.getLogger("absl")
  if not any(isinstance(f, _NoOpenCVAdvice) for f in logger.filters):
    logger.addFilter(_NoOpenCVAdvice())


class _NoOpenCVAdvice:
  """Drops two TFDS warnings that concern no cnnjax user: "OpenCV is not installed" (cnnjax
  decodes with PIL on purpose) and "Variant folder ... has no dataset_info.json" (an embedded
  dataset being prepared into a new directory)."""

  def filter(self, record) -> bool:
    message = str(record.msg)
    return not (message.startswith("OpenCV is not installed")
                or (message.startswith("Variant folder") and "has no" in message))


def _tfds():
  import tensorflow_datasets as tfds  # noqa: PLC0415 - heavy import kept off `import cnnjax`

  _quiet_tfds()

  from cnnjax.data import builders  # noqa: F401, PLC0415 - registers the embedded builders
  return tfds


def embedded_names() -> tuple[str, ...]:
  """The embedded datasets' names, sorted: prepared on first use, no download."""
  from cnnjax.data import builders  # noqa: PLC0415

  return tuple(sorted(builders.EMBEDDED))


def _base_name(name: str) -> str:
  return name.split("/")[0].split(":")[0]


def prepared_names(data_dir: pathlib.Path) -> list[str]:
  """Datasets with a prepared version in `data_dir` (by their directory layout)."""
  if not data_dir.is_dir():
    return []
  found = set()
  for info in data_dir.glob("*/**/dataset_info.json"):
    relative = info.parent.relative_to(data_dir).parts
    if len(relative) >= 2:
      found.add("/".join(relative[:-1]))
  return sorted(found)


def _unknown(name: str, data_dir: pathlib.Path) -> DatasetError:
  import difflib  # noqa: PLC0415

  tfds = _tfds()
  catalog = tfds.list_builders(with_community_datasets=False)
  close = difflib.get_close_matches(_base_name(name), [*embedded_names(), *catalog], n=3)
  hint = f" Did you mean {', '.join(close)}?" if close else ""
  prepared = prepared_names(data_dir)
  return DatasetError(
      f"unknown dataset {name!r}.{hint} Embedded (prepared on first use, no network): "
      f"{', '.join(embedded_names())}. Prepared in {data_dir}: {', '.join(prepared) or 'none'}. "
      f"Any TFDS catalog dataset works once prepared as array_record; a folder of images in "
      f"class subfolders works as '{FOLDER_PREFIX}/path/to/root'.")


def _not_prepared(name: str, data_dir: pathlib.Path, detail: str = "") -> DatasetError:
  base = _base_name(name)
  manual = (f" --manual_dir=/path/to/{base}/tars" if base == "imagenet2012" else "")
  return DatasetError(
      f"dataset {name!r} is not prepared in array_record form under {data_dir}{detail}. "
      "cnnjax never downloads in the middle of a run. Prepare it once, on a machine with network "
      f"access, with:\n  tfds build {name} --data_dir={data_dir} --file_format=array_record{manual}\n"
      f"or point --data_dir / ${DATA_DIR_ENV} at the directory that holds it.")


def builder(name: str, data_dir: str | os.PathLike | None = None, prepare: bool = True,
            progress: bool = True, backend: str = "grain"):
  """The TFDS builder for `name`, its data prepared in `data_dir` as array_record.

  Embedded and folder datasets are prepared on first use (`prepare=True`);
  catalog datasets must be there already.
  """
  data_dir = resolve_data_dir(data_dir)
  tfds = _tfds()
  if name.startswith(FOLDER_PREFIX):
    from cnnjax.data import image_folder  # noqa: PLC0415

    dataset_builder = image_folder.folder_builder(name[len(FOLDER_PREFIX):], data_dir)
  else:
    try:
      dataset_builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
      raise _unknown(name, data_dir) from None
    except ValueError as error:  # e.g. an unknown config of a known dataset
      raise DatasetError(f"dataset {name!r}: {error}") from None
    except Exception as error:  # noqa: BLE001 - e.g. a damaged dataset_info.json
      raise DatasetError(
          f"the prepared data of {name!r} under {data_dir} cannot be read "
          f"({type(error).__name__}: {str(error)[:300]}). Move that dataset's directory aside and "
          "prepare it again; cnnjax will not delete it.") from error
  if _is_prepared(dataset_builder):
    if backend == "grain":
      _check_format(name, dataset_builder, data_dir)
    return dataset_builder
  if _base_name(name) not in embedded_names() and not name.startswith(FOLDER_PREFIX):
    raise _not_prepared(name, data_dir)
  if not prepare:
    raise DatasetError(f"dataset {name!r} is not prepared under {data_dir}; call "
                       "cnnjax.data.prepare or let the pipeline prepare it")
  _prepare(dataset_builder, progress)
  return dataset_builder


def _is_prepared(dataset_builder) -> bool:
  try:
    return bool(dataset_builder.is_prepared())
  except Exception as error:  # noqa: BLE001 - a broken dataset_info.json and the like
    raise DatasetError(f"the prepared data in {dataset_builder.data_dir} cannot be read "
                       f"({type(error).__name__}: {error}). Move that directory aside and prepare "
                       "again; cnnjax will not delete it.") from error


def _check_format(name: str, dataset_builder, data_dir: pathlib.Path) -> None:
  file_format = getattr(dataset_builder.info, "file_format", None)
  value = getattr(file_format, "value", file_format)
  if value is not None and value != "array_record":
    raise _not_prepared(name, data_dir, f" (it is prepared as {value}, which needs TensorFlow; "
                        "use data.backend='tf' with TensorFlow installed, or prepare it again)")


def _prepare(dataset_builder, progress: bool) -> None:
  tfds = _tfds()
  # TFDS's bars are carriage-return frames: drawn on a terminal only, never into a log.
  progress = progress and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
  if not progress:
    tfds.disable_progress_bar()
  try:
    dataset_builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except TypeError:  # builders that take the format only at construction
    dataset_builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    if not progress:
      tfds.enable_progress_bar()


def prepare(name: str, data_dir: str | os.PathLike | None = None, progress: bool = True,
            backend: str = "grain") -> DatasetInfo:
  """Prepares `name` in `data_dir` if it is embedded (or a `folder:` path) and not yet
  prepared; returns its `DatasetInfo` either way. `progress` shows a progress bar; `backend`
  is `grain` or `tf`. Raises `DatasetError` for an unknown name (with the closest ones), a
  catalog dataset not prepared (with the `tfds build` command), or a corrupt image in a
  folder (naming the file; nothing is written)."""
  return info(name, data_dir, progress=progress, backend=backend)


def info(name: str, data_dir: str | os.PathLike | None = None, progress: bool = True,
         backend: str = "grain") -> DatasetInfo:
  """The `DatasetInfo` (classes, image shape, split sizes) of dataset `name` in `data_dir`
  (default: `resolve_data_dir`), preparing an embedded dataset first. Raises
  `DatasetError` for an unknown name (with the closest ones) or an unprepared catalog
  dataset (with the command that prepares it)."""
  dataset_builder = builder(name, data_dir, progress=progress, backend=backend)
  features = dataset_builder.info.features
  if "image" not in features or "label" not in features:
    raise DatasetError(f"dataset {name!r} has features {sorted(features.keys())}; cnnjax needs "
                       "'image' and 'label'")
  label = features["label"]
  splits = {split: int(value.num_examples) for split, value in dataset_builder.info.splits.items()}
  if splits and not any(splits.values()):
    raise DatasetError(f"dataset {name!r} under {dataset_builder.data_dir} has no examples")
  return DatasetInfo(name=name, num_classes=int(label.num_classes),
                     image_shape=tuple(features["image"].shape), splits=splits,
                     class_names=tuple(getattr(label, "names", ()) or ()))


BACKENDS = ("grain", "tf")


def data_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
                backend: str = "grain", in_memory: bool = False):
  """A random-access source of {'image': uint8 HWC, 'label': int} examples.

  `backend="grain"` (default) reads array_record with `tfds.data_source`, no
  TensorFlow. `backend="tf"` reads a dataset prepared in TFDS's default
  tfrecord form with `tfds.load` + `tfds.as_numpy` and holds the split in
  memory (fine for CIFAR-sized data); it needs TensorFlow (`pip install
  'cnnjax[tf]'`). Both give the same examples in the same order.

  The grain backend reads the stored image bytes (`cnnjax.data.encoded`):
  `source[i]` decodes them, and the training pipeline decodes only each crop, a
  JPEG at reduced size. `in_memory=True` decodes the split once and serves the
  decoded arrays (`hold_in_memory`): the same examples, without decoding an
  image per epoch, for splits of fixed-size images that fit in memory.
  """
  if backend not in BACKENDS:
    raise DatasetError(f"data backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "tf":
    return _tf_source(name, split, data_dir)
  dataset_builder = builder(name, data_dir)
  available = list(dataset_builder.info.splits.keys())
  if available and split.split("[")[0] not in available:
    raise DatasetError(f"dataset {name!r} has no split {split!r}; it has {available}")
  image_shape = tuple(dataset_builder.info.features["image"].shape)
  # The stored bytes, decoded by cnnjax: only the crop a step uses, at reduced size for JPEG.
  raw = dataset_builder.as_data_source(split=split,
                                       decoders={"image": _tfds().decode.SkipDecoding()})
  try:
    if len(raw):
      raw[0]
  except ImportError:  # tfds.testing.mock_data encodes its random images with TensorFlow
    source = dataset_builder.as_data_source(split=split)
  else:
    source = encoded.DecodingSource(raw, channels=image_shape[-1] or 3)
  if in_memory:
    return hold_in_memory(source, image_shape, f"{name}[{split}]")
  return source


# Never more than this share of the available memory for one decoded split: the training
# process still has to hold the model, the optimizer state and the step's buffers.
IN_MEMORY_SHARE = 0.5


def available_memory() -> int | None:
  """Bytes the kernel could hand out now (Linux's MemAvailable), else the physical memory."""
  try:
    with open("/proc/meminfo") as handle:
      for line in handle:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (AttributeError, ValueError, OSError):  # not every platform reports it
    return None


def read_examples(source, keys) -> list[dict]:
  """Examples `keys` of `source`, in that order."""
  keys = [int(k) for k in keys]
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:  # one batched read where the source has it (array_record does)
    try:
      return list(getitems(keys))
    except TypeError:  # tfds.testing.mock_data's __getitems__ is unbound; read one by one
      pass
  return [source[k] for k in keys]


def hold_in_memory(source, image_shape: tuple, what: str = "the split",
                   chunk: int = 1024) -> ArraySource:
  """`source` decoded once into an `ArraySource`: the same examples in the same order.

  PNG decoding is about half of the input pipeline's CPU time on small images
  (96-px scenes: 0.6 of 1.3 ms per image on one core), time that a host
  feeding an accelerator runs short of; held, each epoch only crops and
  normalises. Needs images of one fixed shape (`image_shape`) and refuses a
  split whose decoded size would exceed `IN_MEMORY_SHARE` of the memory
  available now, naming the size: what this process already holds (the other
  split) and what other processes hold (a second sweep) count.
  """
  if any(dim is None for dim in image_shape):
    raise DatasetError(f"{what} has images of varying size {image_shape}, which cannot be held "
                       "in memory as one array; set config.data.in_memory=False")
  count = len(source)
  nbytes = count * int(np.prod(image_shape))
  memory = available_memory()
  if memory is not None and nbytes > IN_MEMORY_SHARE * memory:
    raise DatasetError(
        f"{what} decoded is {nbytes / 2**30:.1f} GiB ({count} images of {image_shape}), more "
        f"than {IN_MEMORY_SHARE:.0%} of the {memory / 2**30:.1f} GiB this machine has "
        "available; set config.data.in_memory=False to decode per step instead")
  images = np.empty((count, *image_shape), np.uint8)
  labels = np.empty((count,), np.int64)
  for start in range(0, count, chunk):
    examples = read_examples(source, range(start, min(start + chunk, count)))
    for offset, example in enumerate(examples):
      images[start + offset] = example["image"]
      labels[start + offset] = int(example["label"])
  return ArraySource(images, labels)


def _tf_source(name: str, split: str, data_dir) -> ArraySource:
  try:
    import tensorflow  # noqa: F401, PLC0415
  except ImportError:
    raise DatasetError("data backend 'tf' needs TensorFlow, which is not installed: "
                       "pip install 'cnnjax[tf]', or use the default backend 'grain'") from None
  tfds = _tfds()
  data_dir = resolve_data_dir(data_dir)
  try:
    dataset = tfds.load(name, split=split, data_dir=str(data_dir), download=False,
                        shuffle_files=False)
  except (AssertionError, FileNotFoundError) as error:
    raise _not_prepared(name, data_dir, f" ({error})") from None
  examples = list(tfds.as_numpy(dataset))
  return ArraySource(np.stack([e["image"] for e in examples]),
                     np.asarray([e["label"] for e in examples]))


class ArraySource:
  """An in-memory random-access source with the same interface, for notebooks and tests."""

  def __init__(self, images: np.ndarray, labels: Sequence[int]):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images = np.asarray(images)
    self.labels = np.asarray(labels)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]


# Also at import: grain's worker processes decode in processes that import cnnjax.data
# (to unpickle its transforms) but never call `_tfds`.
_quiet_tfds()
