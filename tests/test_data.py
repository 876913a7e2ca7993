"""Datasets and input pipelines: builders against their sources, epochs, shards, resume, errors."""

import gzip
import json
import os
import pathlib
import re
import tempfile
import time
from unittest import mock

import numpy as np
import pytest

from cnnjax import data
from cnnjax.data import builders, datasets, preprocess
from cnnjax.data.pipeline import EvalBatches, Sharding, TrainBatches

IDENTITY = data.Preprocessing(image_size=4, channels=1, mean=(0.0,), std=(1.0,),
                              train_crop="resize", flip=False, interpolation="nearest")


def _indexed_source(count, size=4):
  """Images whose pixels encode their index, labels = index: every row is traceable."""
  images = np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None, None],
                           (count, size, size, 1)).copy()
  return data.ArraySource(images, np.arange(count))


def _trace(batch):
  return [int(i) for i in batch["label"]]


# -- builders ---------------------------------------------------------------------------------


def test_digits_builder_holds_scikit_learns_digits_in_a_fixed_split(digits_data_dir):
  from sklearn.datasets import load_digits

  info = data.info("digits", digits_data_dir)
  assert info.splits == {"train": 1437, "test": 360} and info.image_shape == (8, 8, 1)
  bunch = load_digits()
  expected = np.round(bunch.images * 255 / 16).astype(np.uint8)
  split = datasets.np.random.default_rng(0).permutation(1797)
  for name, rows in (("test", np.sort(split[:360])), ("train", np.sort(split[360:]))):
    source = data.data_source("digits", name, digits_data_dir)
    stored = {(e["image"][..., 0].tobytes(), int(e["label"])) for e in
              (source[i] for i in range(len(source)))}
    assert stored == {(expected[r].tobytes(), int(bunch.target[r])) for r in rows}


def test_mnist5k_builder_matches_the_csv(tmp_path):
  info = data.prepare("mnist5k", tmp_path, progress=False)
  assert info.splits == {"train": 4000, "test": 1000} and info.image_shape == (28, 28, 1)
  with gzip.open(builders.mnist5k_path(), "rt") as handle:
    table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
  test_rows = np.random.default_rng(0).permutation(5000)[:1000]
  source = data.data_source("mnist5k", "test", tmp_path)
  stored = sorted((source[i]["image"][..., 0].tobytes(), int(source[i]["label"]))
                  for i in range(len(source)))
  expected = sorted((table[r, :-1].astype(np.uint8).tobytes(), int(table[r, -1]))
                    for r in test_rows)
  assert stored == expected


def test_gratings_are_deterministic_balanced_and_need_resolution():
  def render(label, seed, resolution=64):
    return builders.render_grating(resolution, label, np.random.default_rng(seed))

  np.testing.assert_array_equal(render(3, 7), render(3, 7))
  assert not np.array_equal(render(3, 7), render(3, 8))
  labels = [int(np.random.default_rng([0, 0, i]).integers(10)) for i in range(2000)]
  assert min(np.bincount(labels, minlength=10)) > 150

  def grating_contrast(label, factor):
    """Contrast left after shrinking by `factor`, relative to the native image's."""
    ratios = []
    for seed in range(12):
      image = render(label, seed)
      small = preprocess.resize(image, (64 // factor, 64 // factor), "bilinear")
      ratios.append(small.std() / image.std())
    return float(np.median(ratios))

  # Shrunk 4x, coarse gratings keep their contrast and fine ones lose it, band by band.
  kept = [grating_contrast(label, 4) for label in range(0, len(builders.GRATING_CLASSES), 2)]
  assert kept == sorted(kept, reverse=True) and kept[0] > 0.7 and kept[-1] < 0.5 * kept[0]


def test_scenes_encode_the_relation_coarsely_and_the_texture_finely(monkeypatch):
  classes = builders.SCENE_CLASSES
  assert len(classes) == 36
  labels = [int(np.random.default_rng([0, 0, i]).integers(36)) for i in range(3600)]
  assert min(np.bincount(labels, minlength=36)) > 60
  for seed in range(200):
    label = seed % 36
    layout = builders.scene_layout(label, np.random.default_rng(seed))
    relation = builders.SCENE_RELATIONS[label // len(builders.SCENE_TEXTURES)]
    (disc_y, disc_x), (square_y, square_x) = layout["disc"], layout["square"]
    assert ("left" in relation) == (disc_x < square_x) and ("above" in relation) == (disc_y < square_y)
    assert min(abs(disc_x - square_x), abs(disc_y - square_y)) >= builders.SCENE_MIN_OFFSET
    assert all(0.15 < v < 0.85 for v in (disc_y, disc_x, square_y, square_x))

  def dominant_cycles(label, seed, resolution=64):
    """The strongest frequency (cycles per image) of a rendered scene, without the background."""
    image = builders.render_scene(resolution, label, np.random.default_rng(seed)).mean(-1)
    spectrum = np.abs(np.fft.fft2(image - image.mean()))
    spectrum[:4, :4] = spectrum[-4:, :4] = spectrum[:4, -4:] = spectrum[-4:, -4:] = 0
    fy, fx = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    fy, fx = min(fy, resolution - fy), min(fx, resolution - fx)
    return float(np.hypot(fy, fx))

  # Without the distractor rings, the strongest frequency is the class's texture band.
  monkeypatch.setattr(builders, "SCENE_DISTRACTORS", 0)
  for texture, name in enumerate(builders.SCENE_TEXTURES):
    band = texture // len(builders.SCENE_TEXTURE_ANGLES)
    found = [dominant_cycles(texture, seed) for seed in range(6)]
    cycles = builders.SCENE_TEXTURE_CYCLES[band]
    assert all(abs(c - cycles) < 0.15 * cycles for c in found), (name, found)
  np.testing.assert_array_equal(builders.render_scene(32, 5, np.random.default_rng(1)),
                                builders.render_scene(32, 5, np.random.default_rng(1)))


def test_a_small_scenes_config_prepares(tmp_path):
  config = builders.RenderedConfig(name="test32px", resolution=32, train_size=24, test_size=8)
  builder = builders.Scenes(config=config, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source(split="train")
  assert len(source) == 24 and source[0]["image"].shape == (32, 32, 3)
  assert builder.info.features["label"].num_classes == 36


def test_a_custom_gratings_config_prepares_and_a_second_use_finds_it(tmp_path):
  config = builders.RenderedConfig(name="test12px", resolution=12, train_size=30, test_size=10)
  builder = builders.Gratings(config=config, data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source(split="train")
  assert len(source) == 30 and source[0]["image"].shape == (12, 12, 3)
  written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
  builders.Gratings(config=config, data_dir=str(tmp_path),
                    file_format="array_record").download_and_prepare()
  assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written


def test_an_image_folder_becomes_a_dataset(tmp_path):
  from PIL import Image

  root = tmp_path / "pets"
  rng = np.random.default_rng(0)
  for split, count in (("train", 3), ("test", 2)):
    for name in ("cat", "dog"):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        size = (10 + i, 7)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / split / name / f"{i}.png")
  name = f"folder:{root}"
  info = data.prepare(name, tmp_path / "tfds", progress=False)
  assert info.splits == {"train": 6, "test": 4} and info.class_names == ("cat", "dog")
  source = data.data_source(name, "test", tmp_path / "tfds")
  labels = sorted(int(source[i]["label"]) for i in range(len(source)))
  assert labels == [0, 0, 1, 1] and source[0]["image"].shape[-1] == 3


def _photo_folder(root, per_class=3, extra_bytes=None):
  """Real photos shipped by matplotlib and scikit-learn, cropped, saved as JPEG (quality 90)."""
  import matplotlib
  import sklearn
  from PIL import Image

  photos = [pathlib.Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg",
            pathlib.Path(sklearn.__file__).parent / "datasets" / "images" / "china.jpg",
            pathlib.Path(sklearn.__file__).parent / "datasets" / "images" / "flower.jpg"]
  for label, photo in enumerate(photos):
    (root / f"class{label}").mkdir(parents=True)
    with Image.open(photo) as image:
      image = image.convert("RGB")
      for i in range(per_class):
        image.crop((20 * i, 10 * i, 20 * i + 400, 10 * i + 333)).save(
            root / f"class{label}" / f"{i}.jpg", quality=90)
  return sorted(root.rglob("*.jpg"))


def test_a_folder_of_jpegs_is_stored_as_the_files_bytes(tmp_path):
  files = _photo_folder(tmp_path / "photos")
  name = f"folder:{tmp_path / 'photos'}"
  data.prepare(name, tmp_path / "tfds", progress=False)
  source = data.data_source(name, "train", tmp_path / "tfds")
  stored = sorted(e["image"] for e in source.read_encoded(range(len(source))))
  assert stored == sorted(f.read_bytes() for f in files)  # no re-encoding
  assert source[0]["image"].shape == (333, 400, 3) and source[0]["image"].dtype == np.uint8
  # array_record adds a few bytes a record and pads its blocks: two 64 KiB blocks at most here
  # (60 such photos: 1.053x the folder; the 600-photo benchmark folder: benchmarks/).
  records = sum(p.stat().st_size for p in (tmp_path / "tfds").rglob("*.array_record*"))
  assert records <= 1.01 * sum(f.stat().st_size for f in files) + 2 * 2**16


def test_a_corrupt_image_is_named_at_preparation_and_nothing_is_written(tmp_path):
  files = _photo_folder(tmp_path / "photos", per_class=1)
  truncated = files[1].parent / "cut.jpg"
  truncated.write_bytes(files[1].read_bytes()[:5000])
  with pytest.raises(ValueError,
                     match=rf"{re.escape(str(truncated))} is not a readable image .*truncated.*"
                           r"remove or replace it"):
    data.prepare(f"folder:{tmp_path / 'photos'}", tmp_path / "tfds", progress=False)
  assert [p for p in (tmp_path / "tfds").rglob("*") if p.is_file()] == []


def _decoded_rgb(jpeg):
  """The whole image decoded by PIL at full size: the reference the fast paths are held to."""
  import io

  from PIL import Image

  with Image.open(io.BytesIO(jpeg)) as image:
    return np.asarray(image.convert("RGB"))


def test_a_jpeg_crop_decodes_at_reduced_size_and_matches_the_full_decode():
  """The crop decoded via the DCT scale is smaller than the full-size crop, and resized to
  the target it differs from the full-size crop resized only by resampling."""
  import matplotlib

  from cnnjax.data import encoded, preprocess

  photo = pathlib.Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
  jpeg = photo.read_bytes()
  full = _decoded_rgb(jpeg)
  assert encoded.size_of(jpeg) == full.shape[:2]
  box = (40, 60, 400, 360)  # top, left, height, width
  reduced = encoded.decode(jpeg, 3, crop=box, target=(96, 96))
  assert reduced.shape[0] < 400 and reduced.shape[0] >= 96  # 1/2 or 1/4 scale, never below
  fast = preprocess.resize(reduced, (96, 96))
  exact = preprocess.resize(full[40:440, 60:420], (96, 96))
  assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 3.0
  # The whole training transform from bytes: the same draws as from the decoded image.
  pre = data.Preprocessing(image_size=96, flip=True)
  from_bytes = pre.train_encoded(jpeg, np.random.default_rng(3))
  from_array = pre.train(full, np.random.default_rng(3))
  assert from_bytes.shape == from_array.shape == (96, 96, 3)
  assert np.abs(from_bytes - from_array).mean() < 0.1  # normalised units: a few levels of 255


def test_a_region_is_the_crop_that_the_device_resizes_as_the_host_would():
  """`host_stages="region"` (augment_on="device" for images of varying size): the host stops
  at the crop, decoded at the DCT scale, and the step's resize of it is the host's resized
  crop from the same draws within resampling's rounding; from bytes and from an array."""
  import jax
  import jax.numpy as jnp
  import matplotlib

  from cnnjax.data import device_augment

  jpeg = (pathlib.Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").read_bytes()
  full = _decoded_rgb(jpeg)
  size = 64
  region_pre = data.Preprocessing(image_size=size, output="uint8", host_stages="region")
  crop_pre = data.Preprocessing(image_size=size, output="uint8", host_stages="crop")
  fitted = 0
  # One compilation for every region: the step's resize, from the canvas.
  resize_region = jax.jit(lambda canvas, hw: device_augment.resize_box(
      canvas, jnp.stack([0, 0, hw[0], hw[1]]), size))
  for seed in range(12):
    for region, resized in (
        (region_pre.train_encoded(jpeg, np.random.default_rng(seed)),
         crop_pre.train_encoded(jpeg, np.random.default_rng(seed))),
        (region_pre.train(full, np.random.default_rng(seed)),
         crop_pre.train(full, np.random.default_rng(seed)))):
      assert region.dtype == np.uint8 and region.shape[-1] == 3
      limit = region_pre.region_limit
      assert max(region.shape[:2]) <= limit == 2 * size
      fitted += max(region.shape[:2]) == limit
      canvas = np.zeros((limit, limit, 3), np.uint8)
      canvas[:region.shape[0], :region.shape[1]] = region
      device = resize_region(jnp.asarray(canvas, jnp.float32), jnp.asarray(region.shape[:2]))
      # Two antialiased bilinear filters; a region shrunk to fit the canvas is resized twice.
      assert np.abs(np.asarray(device) - resized).mean() < 2.5
  assert fitted  # the shrink-to-fit path ran
  with pytest.raises(ValueError, match="train_crop='pad_crop' needs host_stages='crop'"):
    data.Preprocessing(image_size=size, output="uint8", host_stages="region", train_crop="pad_crop")


def test_region_batches_lie_on_zeroed_canvases_with_their_sizes(tmp_path):
  _photo_folder(tmp_path / "photos", per_class=2)
  name = f"folder:{tmp_path / 'photos'}"
  data.prepare(name, tmp_path / "tfds", progress=False)
  source = data.data_source(name, "train", tmp_path / "tfds")
  pre = data.Preprocessing(image_size=48, output="uint8", host_stages="region")
  batches = TrainBatches(source, pre, global_batch=4, seed=0)
  batch = batches(1)
  assert batch["image"].shape == (4, 96, 96, 3) and batch["region"].shape == (4, 2)
  epoch, positions = batches.positions(1)
  examples = source.read_encoded(batch["index"])
  for image, (h, w), example, position in zip(batch["image"], batch["region"], examples,
                                              positions):
    expected = pre.train_encoded(example["image"],
                                 np.random.default_rng([0, epoch, position, 1]))
    assert (h, w) == expected.shape[:2]
    np.testing.assert_array_equal(image[:h, :w], expected)
    assert not image[h:].any() and not image[:, w:].any()


def test_preparing_leaves_nothing_in_the_temp_directory(tmp_path, monkeypatch):
  """tfds leaves an empty tmp*tfds directory per unprepared builder unless told it is offline."""
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  (tmp_path / "pets" / "cat").mkdir(parents=True)
  from PIL import Image

  Image.new("RGB", (4, 4)).save(tmp_path / "pets" / "cat" / "0.png")
  config = builders.RenderedConfig(name="test8px", resolution=8, train_size=4, test_size=2)
  builders.Gratings(config=config, data_dir=str(tmp_path / "tfds"),
                    file_format="array_record").download_and_prepare()
  data.prepare(f"folder:{tmp_path / 'pets'}", tmp_path / "tfds", progress=False)
  assert sorted(p.name for p in temp.iterdir()) == []


# -- errors ----------------------------------------------------------------------------------


def test_an_unknown_dataset_lists_the_available_ones(digits_data_dir):
  with pytest.raises(data.DatasetError, match=r"unknown dataset 'digitz'.*Did you mean digits.*"
                                              r"Embedded .*gratings, mnist5k"):
    data.info("digitz", digits_data_dir)


def test_a_missing_catalog_dataset_fails_fast_with_the_command_to_prepare_it(tmp_path):
  start = time.perf_counter()
  with pytest.raises(data.DatasetError, match=r"tfds build cifar10 --data_dir=.* "
                                              r"--file_format=array_record"):
    data.data_source("cifar10", "train", tmp_path)
  assert time.perf_counter() - start < 10  # no network, no hang


def test_a_broken_data_directory_gives_a_clear_error_and_nothing_is_touched(digits_data_dir,
                                                                           tmp_path):
  import shutil

  broken = tmp_path / "tfds"
  shutil.copytree(digits_data_dir, broken)
  info_file = next(broken.glob("digits/*/dataset_info.json"))
  info_file.write_text("{ not json")
  before = {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()}
  with pytest.raises(data.DatasetError, match="cannot be read.*Move that dataset.s directory aside"):
    data.info("digits", broken)
  assert {p: p.read_bytes() for p in broken.rglob("*") if p.is_file()} == before
  assert data.info("digits", digits_data_dir).splits["test"] == 360  # other data unaffected


def test_the_tf_backend_without_tensorflow_names_the_fix():
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    with pytest.raises(data.DatasetError, match=r"needs TensorFlow.*pip install 'cnnjax\[tf\]'"):
      data.data_source("digits", "train", backend="tf")
  else:
    pytest.skip("TensorFlow is installed")


def test_tf_backend_gives_the_same_examples(tmp_path):
  pytest.importorskip("tensorflow")
  import tensorflow_datasets as tfds

  tfds.builder("digits", data_dir=str(tmp_path)).download_and_prepare()  # tfrecord
  data.prepare("digits", tmp_path / "ar", progress=False)
  via_tf = data.data_source("digits", "test", tmp_path, backend="tf")
  via_grain = data.data_source("digits", "test", tmp_path / "ar")
  assert len(via_tf) == len(via_grain)
  for i in range(len(via_tf)):
    np.testing.assert_array_equal(via_tf[i]["image"], via_grain[i]["image"])


def test_a_split_held_in_memory_gives_the_identical_training_and_eval_batches(digits_data_dir):
  pre = data.Preprocessing(image_size=8, channels=1, mean=(0.5,), std=(0.25,),
                           train_crop="random_resized", crop_scale=(0.5, 1.0), flip=True)
  for split in ("train", "test"):
    read = data.data_source("digits", split, digits_data_dir)
    held = data.data_source("digits", split, digits_data_dir, in_memory=True)
    assert isinstance(held, data.ArraySource) and len(held) == len(read)
    assert held.images.shape == (len(read), 8, 8, 1) and held.images.dtype == np.uint8
    batches = [TrainBatches(source, pre, global_batch=32, seed=5) for source in (read, held)]
    for step in (0, 7, batches[0].steps_per_epoch + 3):  # two epochs, two orders
      expected, got = batches[0](step), batches[1](step)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    evals = [[EvalBatches(source, pre, 64)(i) for i in range(2)] for source in (read, held)]
    for expected, got in zip(*evals, strict=True):
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_holding_a_split_in_memory_refuses_varying_sizes_and_too_much_memory(monkeypatch):
  source = _indexed_source(10)
  with pytest.raises(data.DatasetError, match=r"varying size.*in_memory=False"):
    datasets.hold_in_memory(source, (None, None, 3), "folder[train]")
  # What the check compares against: memory free to take now, so no more than the machine has.
  available = datasets.available_memory()
  assert 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  # 10 images of 4x4x1 are 160 bytes: a machine with 300 bytes available may hold half of it.
  monkeypatch.setattr(datasets, "available_memory", lambda: 300)
  with pytest.raises(data.DatasetError, match=r"10 images of \(4, 4, 1\).*in_memory=False"):
    datasets.hold_in_memory(source, (4, 4, 1), "tiny[train]")
  monkeypatch.setattr(datasets, "available_memory", lambda: 400)
  held = datasets.hold_in_memory(source, (4, 4, 1), chunk=3)  # chunks that do not divide 10
  np.testing.assert_array_equal(held.images, source.images)
  np.testing.assert_array_equal(held.labels, source.labels)


# -- pipelines -------------------------------------------------------------------------------


def test_an_epoch_visits_every_example_once_and_the_seed_fixes_the_order():
  source = _indexed_source(96)
  batches = TrainBatches(source, IDENTITY, global_batch=16, seed=3)
  assert batches.steps_per_epoch == 6
  epoch0 = sum((_trace(batches(s)) for s in range(6)), [])
  epoch1 = sum((_trace(batches(s)) for s in range(6, 12)), [])
  assert sorted(epoch0) == list(range(96)) and sorted(epoch1) == list(range(96))
  assert epoch0 != epoch1  # a new order each epoch
  again = TrainBatches(source, IDENTITY, global_batch=16, seed=3)
  assert sum((_trace(again(s)) for s in range(6)), []) == epoch0
  other = TrainBatches(source, IDENTITY, global_batch=16, seed=4)
  assert sum((_trace(other(s)) for s in range(6)), []) != epoch0
  # The pixels really are the examples' (the pipeline reads what it says it reads).
  batch = batches(0)
  np.testing.assert_allclose(batch["image"][:, 0, 0, 0] * 255, batch["label"], atol=1e-3)


def test_the_remainder_is_dropped_in_training_and_never_repeated():
  batches = TrainBatches(_indexed_source(100), IDENTITY, global_batch=16, seed=0)
  seen = sum((_trace(batches(s)) for s in range(batches.steps_per_epoch)), [])
  assert len(seen) == 96 and len(set(seen)) == 96


def test_two_processes_together_see_every_example_once_and_form_the_same_batch():
  source = _indexed_source(96)
  whole = TrainBatches(source, IDENTITY, global_batch=16, seed=5)
  halves = [TrainBatches(source, IDENTITY, global_batch=16, seed=5, sharding=Sharding(i, 2))
            for i in range(2)]
  for step in range(12):
    parts = [_trace(h(step)) for h in halves]
    assert len(parts[0]) == 8 and not set(parts[0]) & set(parts[1])
    assert parts[0] + parts[1] == _trace(whole(step))  # the global batch does not depend on P


def test_a_restored_iterator_yields_the_identical_next_batch():
  pre = data.Preprocessing(image_size=6, train_crop="random_resized", flip=True,
                           rand_augment=(2, 9))
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 255, (40, 9, 9, 3), dtype=np.uint8), np.arange(40))
  batches = TrainBatches(source, pre, global_batch=8, seed=1)
  iterator = data.train_iterator(batches, num_steps=20)
  for _ in range(7):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # it survives a JSON checkpoint
  expected = next(iterator)
  resumed = data.train_iterator(batches, num_steps=20)
  resumed.set_state(state)
  actual = next(resumed)
  assert state == {"next_index": 7}
  for key in ("image", "label"):
    np.testing.assert_array_equal(actual[key], expected[key])


@pytest.mark.parametrize("processes", [1, 2])
def test_evaluation_counts_every_example_exactly_once(processes):
  # 103 examples, global batch 12 over 4 "devices" in `processes` processes: divides nothing.
  source = _indexed_source(103)
  counted = []
  for index in range(processes):
    batches = EvalBatches(source, IDENTITY, global_batch=12, sharding=Sharding(index, processes))
    assert batches.num_batches == 9
    for batch in data.eval_iterator(batches):
      assert len(batch["label"]) == 12 // processes
      counted += [int(l) for l, m in zip(batch["label"], batch["mask"]) if m]
  assert sorted(counted) == list(range(103))


def test_cifar10_from_tfds_mock_data_through_the_whole_pipeline(tmp_path):
  import tensorflow_datasets as tfds

  from cnnjax import train

  # mock_data stands in for prepared files; cnnjax's own "is it prepared" check is told yes.
  with tfds.testing.mock_data(num_examples=48), \
       mock.patch.object(datasets, "_is_prepared", return_value=True):
    info = data.info("cifar10", tmp_path)
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
    source = data.data_source("cifar10", "train", tmp_path)
    pre = data.Preprocessing(image_size=32, train_crop="pad_crop", rand_augment=(1, 5))
    batch = TrainBatches(source, pre, global_batch=16, seed=0)(0)
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].max() < 10
    config = train.default_config()
    config.data.dataset, config.data.data_dir = "cifar10", str(tmp_path)
    config.data.train_crop = "pad_crop"
    config.model_overrides.widths = (4, 4, 4)
    config.batch_size, config.num_steps, config.progress_bar = 16, 2, False
    config.fast_compile = True
    result = train.train_and_evaluate(config, tmp_path / "run")
  assert result["step"] == 2 and result["count"] == 48 and np.isfinite(result["loss"])


# -- preprocessing ---------------------------------------------------------------------------


def test_preprocessing_geometry_and_normalisation():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
  # Centre crop: the shorter side goes to 32 / 0.5 = 64, then the central 32x32.
  cropped = preprocess.center_crop(image, 32, crop_fraction=0.5, interpolation="nearest")
  resized = preprocess.resize(image, (64, 85), "nearest")
  np.testing.assert_array_equal(cropped, resized[16:48, 26:58])
  for _ in range(20):
    assert preprocess.random_resized_crop(image, rng, 24).shape == (24, 24, 3)
  padded = preprocess.pad_and_crop(image[:32, :32], np.random.default_rng(1), 32, 4)
  assert padded.shape == (32, 32, 3)
  gray = data.Preprocessing(image_size=8, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25,) * 3,
                            train_crop="resize")
  out = gray.eval(np.full((8, 8, 1), 255, np.uint8))
  assert out.shape == (8, 8, 3) and np.allclose(out, (1 - 0.5) / 0.25)
  assert not np.array_equal(preprocess.resize(image, (20, 20), "bicubic"),
                            preprocess.resize(image, (20, 20), "bilinear"))


@pytest.mark.parametrize("channels,stored", [(3, 3), (1, 1), (3, 1), (1, 3)])
def test_normalisation_equals_the_float32_formula_bit_for_bit(channels, stored):
  # Every value in every channel, contiguous and as a flipped (strided) view, as training sees it.
  mean, std = (0.485, 0.456, 0.406)[:channels], (0.229, 0.224, 0.225)[:channels]
  pre = data.Preprocessing(image_size=16, channels=channels, mean=mean, std=std)
  values = np.arange(256, dtype=np.uint8)
  image = np.stack([np.roll(values, 7 * c) for c in range(stored)], -1).reshape(16, 16, stored)
  for view in (image, image[:, ::-1]):
    if stored == 1 and channels == 3:
      want = np.repeat(view, 3, axis=-1)
    elif stored == 3 and channels == 1:
      want = np.round(view @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)[..., None]
    else:
      want = view
    want = (want.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    got = pre._finish(view)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
  # Not uint8 (a float image): computed directly, with the same result.
  np.testing.assert_array_equal(pre._finish(image.astype(np.float32)), pre._finish(image))


def test_rand_augment_is_a_function_of_its_generator():
  image = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
  a = preprocess.rand_augment(image, np.random.default_rng(5), 3, 15)
  b = preprocess.rand_augment(image, np.random.default_rng(5), 3, 15)
  np.testing.assert_array_equal(a, b)
  changed = sum(not np.array_equal(preprocess.rand_augment(image, np.random.default_rng(s), 2, 20),
                                   image) for s in range(10))
  assert changed >= 8
  with pytest.raises(ValueError, match="magnitude"):
    preprocess.rand_augment(image, np.random.default_rng(0), 1, 31)


def test_a_model_too_small_for_the_configured_image_size_fails_before_training(digits_data_dir,
                                                                               tmp_path):
  from cnnjax import train
  from cnnjax.models.common import InputTooSmallError

  config = train.default_config()
  config.model, config.data.data_dir, config.data.image_size = "alexnet", str(digits_data_dir), 32
  config.progress_bar = False
  with pytest.raises(InputTooSmallError, match="63"):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_worker_processes_deliver_the_same_batches():
  pre = data.Preprocessing(image_size=6, train_crop="random_resized", rand_augment=(1, 9))
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 255, (40, 9, 9, 3), dtype=np.uint8), np.arange(40))
  batches = TrainBatches(source, pre, global_batch=8, seed=1)
  in_process = list(data.train_iterator(batches, num_steps=6))
  with_workers = list(data.train_iterator(batches, num_steps=6, num_workers=2))
  assert len(with_workers) == 6
  # Resuming by position alone (what a run does when the worker count changed) agrees too.
  resumed = list(data.train_iterator(batches, num_steps=6, num_workers=2, start_step=4))
  np.testing.assert_array_equal(resumed[0]["image"], in_process[4]["image"])
  assert len(resumed) == 2
  for a, b in zip(in_process, with_workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_uint8_batches_normalised_in_the_step_equal_the_hosts_float32():
  """The loop sends uint8 (a quarter of the bytes) and normalises on the device."""
  from cnnjax.train import steps

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 20, 20, 3), dtype=np.uint8)
  settings = dict(image_size=16, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
  host = data.Preprocessing(**settings)
  device = data.Preprocessing(**settings, output="uint8")
  on_host = np.stack([host.train(im, np.random.default_rng(i)) for i, im in enumerate(images)])
  sent = np.stack([device.train(im, np.random.default_rng(i)) for i, im in enumerate(images)])
  assert sent.dtype == np.uint8 and on_host.dtype == np.float32
  normalised = np.asarray(steps.normalize(sent, (settings["mean"], settings["std"])))
  np.testing.assert_allclose(normalised, on_host, rtol=1e-6, atol=1e-6)
  assert steps.normalize(on_host, (settings["mean"], settings["std"])) is on_host
  with pytest.raises(ValueError, match=r"output must be one of \('float32', 'uint8'\)"):
    data.Preprocessing(image_size=16, output="float16")


def test_the_worker_default_is_decided_per_platform(monkeypatch):
  from cnnjax.data import pipeline

  monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
  assert data.default_workers(None, "gpu") == data.default_workers(None, "tpu") == 6
  assert data.default_workers(None, "cpu") == 0  # the step needs the cores
  assert data.default_workers(3, "gpu") == 3 and data.default_workers(0, "gpu") == 0
  with pytest.raises(ValueError, match=r"num_workers must be >= 0 .*got -1"):
    data.default_workers(-1)
