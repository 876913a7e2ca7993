"""Augmentation in the step (`cnnjax.data.device_augment`) against the host's and timm's.

Each statistic is checked against an independent computation: the host's NumPy/PIL
transforms (`cnnjax.data.preprocess`), SciPy's Beta distribution, or a NumPy rendering
of timm's `rand_bbox`, with two-sample or goodness-of-fit tests at p > 1e-3 (a false
alarm in one run of the suite in a thousand per test).
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cnnjax import train
from cnnjax.data import device_augment as da
from cnnjax.data import preprocess
from cnnjax.train import checkpoint as checkpoint_lib
from cnnjax.train import loop
from cnnjax.train.config import with_overrides

DRAWS = 4000
P_MIN = 1e-3


def _photo(height, width):
  import matplotlib
  from PIL import Image

  path = pathlib.Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
  return np.asarray(Image.open(path).convert("RGB").resize((width, height)))


def _keys(count, seed=0):
  return jax.random.split(jax.random.key(seed), count)


# -- per-example transforms -----------------------------------------------------------------


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_each_rand_augment_op_is_the_hosts_pil_op_within_one_level(sign):
  image = _photo(40, 48)
  level = 9 / 30
  op = jax.jit(da.apply_op, static_argnums=2)

  class Sign:  # the host's _signed draws rng.random() < 0.5 for +
    def random(self):
      return 0.0 if sign > 0 else 0.9

  from PIL import Image

  for index, name in enumerate(da.RAND_AUGMENT_OPS):
    host = np.asarray(preprocess.RAND_AUGMENT_OPS[name](Image.fromarray(image), level, Sign()))
    device = np.asarray(op(jnp.asarray(image, jnp.float32), index, level, sign))
    difference = np.abs(host.astype(float) - device)
    assert difference.max() <= 1 and difference.mean() < 0.05, (name, difference.mean())


def test_crop_area_and_aspect_follow_the_hosts_distributions():
  """Two-sample KS tests: the device's boxes against the host's `sample_crop`, on a wide
  image where some draws fall back to the central crop."""
  height, width = 60, 150
  boxes = np.asarray(jax.jit(jax.vmap(
      lambda k: da.sample_crop(k, height, width)))(_keys(DRAWS)))
  rng = np.random.default_rng(0)
  host = np.asarray([preprocess.sample_crop(height, width, rng) for _ in range(DRAWS)])
  for column, what in ((None, "area"), (None, "aspect"), (0, "top"), (1, "left")):
    if what == "area":
      device_values, host_values = boxes[:, 2] * boxes[:, 3], host[:, 2] * host[:, 3]
    elif what == "aspect":
      device_values, host_values = boxes[:, 3] / boxes[:, 2], host[:, 3] / host[:, 2]
    else:
      device_values, host_values = boxes[:, column], host[:, column]
    assert stats.ks_2samp(device_values, host_values).pvalue > P_MIN, what
  assert (boxes[:, 0] + boxes[:, 2] <= height).all() and (boxes[:, 1] + boxes[:, 3] <= width).all()
  assert (boxes[:, 2:] > 0).all()


def test_the_device_crop_resizes_as_pil_does():
  image = _photo(120, 160)
  box = (10, 30, 90, 100)  # top, left, h, w
  device = np.asarray(da.resize_box(jnp.asarray(image, jnp.float32), jnp.asarray(box), 48))
  host = preprocess.resize(image[10:100, 30:130], (48, 48))
  assert np.abs(device - host).mean() < 1.5  # two antialiased bilinear filters, uint8 levels


def test_flip_rate_and_rand_augment_op_frequencies():
  image = jnp.asarray(_photo(16, 16))
  config = da.DeviceAugment(image_size=16, crop="none", flip=True, mean=(0.0,), std=(1 / 255,))
  out = np.asarray(jax.jit(jax.vmap(functools.partial(da.augment_example, config=config),
                                    in_axes=(0, None)))(_keys(DRAWS), image))
  flipped = np.all(np.abs(out - np.asarray(image)[:, ::-1]) < 1e-3, axis=(1, 2, 3))
  same = np.all(np.abs(out - np.asarray(image)) < 1e-3, axis=(1, 2, 3))
  assert (flipped ^ same).all()
  assert stats.binomtest(int(flipped.sum()), DRAWS, 0.5).pvalue > P_MIN
  ops, signs = jax.jit(jax.vmap(lambda k: da.rand_augment_choices(k, 2)))(_keys(DRAWS, 1))
  counts = np.bincount(np.asarray(ops).ravel(), minlength=len(da.RAND_AUGMENT_OPS))
  assert stats.chisquare(counts).pvalue > P_MIN  # uniform, as the host's rng.integers
  assert stats.binomtest(int((np.asarray(signs) > 0).sum()), signs.size, 0.5).pvalue > P_MIN


def test_random_erasing_rate_and_box_areas():
  height = width = 32
  boxes = np.asarray(jax.jit(jax.vmap(lambda k: da.erase_box(k, height, width)))(_keys(DRAWS)))
  area = boxes[:, 2] * boxes[:, 3] / (height * width)
  found = area > 0
  assert found.mean() > 0.95
  # rounding moves an area by at most a row and a column
  assert (area[found] >= 0.02 - 2 / 32).all() and (area[found] <= 1 / 3 + 2 / 32).all()
  image = jnp.zeros((height, width, 3))
  erased = jax.jit(jax.vmap(lambda k: da.random_erase(k, image, 0.25, "pixel")))(_keys(DRAWS))
  touched = np.asarray(jnp.any(erased != 0, axis=(1, 2, 3)))
  assert stats.binomtest(int(touched.sum()), DRAWS, 0.25 * found.mean()).pvalue > P_MIN


# -- mixup and cutmix (timm's Mixup, batch mode) --------------------------------------------


def _timm_cutmix_lam(rng, alpha, height, width):
  """timm's `cutmix_bbox_and_lam` (no margins, correct_lam=True), in NumPy."""
  lam = rng.beta(alpha, alpha)
  cut = np.sqrt(1 - lam)
  cut_h, cut_w = int(height * cut), int(width * cut)
  cy, cx = rng.integers(0, height), rng.integers(0, width)
  yl, yh = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
  xl, xh = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
  return 1 - (yh - yl) * (xh - xl) / (height * width)


def _mix_many(config, images, count=DRAWS):
  return jax.jit(jax.vmap(lambda k: da.mix(k, images, config)))(_keys(count, 2))


def test_mixup_lambda_is_beta_and_the_images_are_mixed_with_the_reversed_batch():
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 8, 8, 3)), jnp.float32)
  config = da.DeviceAugment(image_size=8, mixup_alpha=0.4)
  mixed, mixing = _mix_many(config, images)
  lam = np.asarray(mixing.lam)
  assert stats.kstest(lam, stats.beta(0.4, 0.4).cdf).pvalue > P_MIN
  expected = lam[:, None, None, None, None] * images + (1 - lam[:, None, None, None, None]) * images[::-1]
  np.testing.assert_allclose(mixed, expected, atol=1e-5)
  assert not np.asarray(mixing.used_cutmix).any()


def test_cutmix_boxes_and_corrected_lambda_follow_timm():
  height, width = 24, 20
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(4, height, width, 3)), jnp.float32)
  config = da.DeviceAugment(image_size=height, cutmix_alpha=1.0)
  mixed, mixing = _mix_many(config, images)
  lam = np.asarray(mixing.lam)
  # The pasted pixels come from the reversed batch, and lam is the share left unpasted.
  from_reversed = np.all(np.isclose(mixed, images[::-1]), axis=-1) & ~np.all(
      np.isclose(images, images[::-1]), axis=-1)
  np.testing.assert_allclose(from_reversed[:, 0].mean(axis=(1, 2)), 1 - lam, atol=1e-6)
  rng = np.random.default_rng(0)
  timm = [_timm_cutmix_lam(rng, 1.0, height, width) for _ in range(DRAWS)]
  # lam takes discrete values (pixel counts): rounded, float32 and float64 ones tie as they should.
  assert stats.ks_2samp(np.round(lam.astype(np.float64), 5), np.round(timm, 5)).pvalue > P_MIN
  assert np.asarray(mixing.used_cutmix).all()


def test_mix_prob_and_switch_prob_rates():
  images = jnp.zeros((2, 8, 8, 3))
  config = da.DeviceAugment(image_size=8, mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.6,
                            switch_prob=0.3)
  _, mixing = _mix_many(config, images)
  lam, cut = np.asarray(mixing.lam), np.asarray(mixing.used_cutmix)
  applied = cut | (lam < 1)
  assert stats.binomtest(int(applied.sum()), DRAWS, 0.6).pvalue > P_MIN
  assert stats.binomtest(int(cut.sum()), int(applied.sum()), 0.3).pvalue > P_MIN


def test_the_mixed_loss_is_cross_entropy_against_timms_smoothed_mixed_targets():
  """The step's loss mixes two cross-entropies; timm mixes the targets. Equal by linearity,
  checked against targets built as timm's `mixup_target` builds them."""
  from cnnjax.train import steps

  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, size=6))
  lam, smoothing = 0.3, 0.1
  off, on = smoothing / 5, 1 - smoothing + smoothing / 5
  y1 = np.full((6, 5), off)
  y1[np.arange(6), labels] = on
  y2 = y1[::-1]
  targets = lam * y1 + (1 - lam) * y2
  expected = -(targets * jax.nn.log_softmax(logits)).sum(-1).mean()
  ours = (lam * steps.cross_entropy(logits, labels, 5, smoothing).mean()
          + (1 - lam) * steps.cross_entropy(logits, labels[::-1], 5, smoothing).mean())
  assert float(ours) == pytest.approx(float(expected), rel=1e-6)


# -- bad input ------------------------------------------------------------------------------


def test_bad_settings_name_the_valid_values(digits_data_dir):
  from cnnjax.train import config as config_lib

  def check(overrides):
    config_lib.validate(with_overrides(train.default_config(), overrides))

  with pytest.raises(ValueError, match=r"augment_on must be one of \('host', 'device'\), got 'gpu'"):
    check({"data.augment_on": "gpu"})
  with pytest.raises(ValueError, match=r"mixup_alpha must be 0 \(off\) or a positive"):
    check({"data.mixup_alpha": -0.2})
  with pytest.raises(ValueError, match=r"cutmix_alpha must be 0 \(off\) or a positive"):
    check({"data.cutmix_alpha": float("nan")})
  with pytest.raises(ValueError, match=r"mix_prob must be a probability in \[0, 1\]"):
    check({"data.mix_prob": 1.5})
  with pytest.raises(ValueError, match="augment_on='device'"):
    check({"data.device_resident": True, "data.augment_on": "host"})
  # The digits are 8x8: a 16 px random resized crop on the device cannot come from them.
  config = with_overrides(train.default_config(), {
      "data.data_dir": str(digits_data_dir), "data.augment_on": "device",
      "data.image_size": 16, "data.train_crop": "random_resized"})
  with pytest.raises(ValueError, match=r"crops 16x16 from images of 8x8, which are smaller"):
    loop.build(config)
  # A region crop needs each example's region from the host.
  with pytest.raises(ValueError, match=r"crop='region' needs each example's region"):
    da.augment_example(jax.random.key(0), jnp.zeros((8, 8, 3)),
                       da.DeviceAugment(image_size=4, crop="region"))


# -- in the training loop: exact resume, the resident split ---------------------------------

TINY = {"data.image_size": 16, "data.train_crop": "pad_crop", "data.pad": 2, "data.mean": [0.5],
        "data.std": [0.5], "model_overrides.widths": [8, 8, 16], "model_overrides.depth": 8,
        "batch_size": 32, "optimizer.learning_rate": 0.02, "optimizer.schedule": "constant",
        "progress_bar": False, "fast_compile": True, "num_steps": 10, "eval_every_epochs": 10 / 44,
        "checkpoint_every_epochs": 5 / 44, "data.augment_on": "device",
        "data.rand_augment_ops": 1, "data.mixup_alpha": 0.2, "data.cutmix_alpha": 1.0,
        "data.erase_prob": 0.25}


def _final_params(workdir):
  manager = checkpoint_lib.make_manager(pathlib.Path(workdir) / "checkpoints", async_save=False)
  state = manager.restore(manager.latest_step())["state"]
  return jax.tree.leaves({"params": state["params"], "batch_stats": state["batch_stats"]})


def test_device_augmentation_resumes_exactly_on_either_path(digits_data_dir, tmp_path):
  """10 steps with the split on the device, against 5 steps read by the host (augmented in
  the step) then 5 resumed with the split on the device, and the reverse: the same params,
  bit for bit. The two paths feed the step the same uint8 rows."""
  base = {**TINY, "data.data_dir": str(digits_data_dir)}

  def run(workdir, resident, stop=None):
    overrides = {**base, "data.device_resident": resident}
    if stop:
      overrides["stop_after_steps"] = stop
    return train.train_and_evaluate(with_overrides(train.default_config(), overrides), workdir)

  run(tmp_path / "whole", True)
  run(tmp_path / "host_then_device", False, stop=5)
  run(tmp_path / "host_then_device", True)
  run(tmp_path / "device_then_host", True, stop=5)
  result = run(tmp_path / "device_then_host", False)
  assert result["step"] == 10 and np.isfinite(result["train_loss"])
  whole = _final_params(tmp_path / "whole")
  for other in ("host_then_device", "device_then_host"):
    assert all(np.array_equal(a, b) for a, b in zip(whole, _final_params(tmp_path / other)))


def test_jpegs_of_varying_size_are_cropped_on_the_host_resized_in_the_step_and_resume_exactly(
    tmp_path):
  """A folder of JPEGs of varying size with augment_on="device": the host sends each random
  resized crop's region uncut by any resize, the step resizes and augments it; 6 steps against
  3 then 3 resumed give the same params, bit for bit."""
  from PIL import Image

  photo = _photo(120, 100)
  rng = np.random.default_rng(0)
  for index in range(40):
    height, width = (int(v) for v in rng.integers(24, 60, size=2))
    top, left = int(rng.integers(0, 120 - height)), int(rng.integers(0, 100 - width))
    path = tmp_path / "photos" / f"class{index % 4}" / f"{index}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(photo[top:top + height, left:left + width]).save(path, quality=90)
  config = with_overrides(train.default_config(), {
      **TINY, "data.dataset": f"folder:{tmp_path / 'photos'}", "data.eval_split": "train",
      "data.data_dir": str(tmp_path / "tfds"), "data.train_crop": "random_resized",
      "num_steps": 6, "checkpoint_every_epochs": 3.0, "eval_every_epochs": 6.0})
  run = loop.build(config)
  assert run.train_batches.preprocessing.host_stages == "region"
  assert run.step_config.augment.crop == "region"
  assert run.train_batches(0)["region"].max() <= 32  # at most twice the 16 px input

  whole = train.train_and_evaluate(config, tmp_path / "whole")
  train.train_and_evaluate(with_overrides(config, {"stop_after_steps": 3}), tmp_path / "resumed")
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")
  assert whole["step"] == resumed["step"] == 6 and np.isfinite(whole["train_loss"])
  assert all(np.array_equal(a, b) for a, b in zip(_final_params(tmp_path / "whole"),
                                                  _final_params(tmp_path / "resumed")))


def test_a_split_over_the_device_memory_share_stays_on_the_host(digits_data_dir, caplog,
                                                              monkeypatch):
  monkeypatch.setattr(loop, "device_memory_bytes", lambda device=None: 1_000_000)
  config = with_overrides(train.default_config(), {
      **TINY, "data.data_dir": str(digits_data_dir), "data.device_resident": True,
      "data.device_memory_share": 0.25})
  with caplog.at_level("WARNING", logger="cnnjax.train"):
    run = loop.build(config)
  assert run.resident_data is None
  # 1437 digits of 8x8, as 3 channels: 269.4 KiB, over 0.25 of 1 MB.
  assert ("269.4 KiB (1437 images of (8, 8, 1)), over the 244.1 KiB that "
          "device_memory_share=0.25 of a device's 976.6 KiB allows") in caplog.text
  monkeypatch.setattr(loop, "device_memory_bytes", lambda device=None: 10**9)
  run = loop.build(config)
  assert run.resident_data["image"].shape == (1437, 8, 8, 3)


def test_the_steps_import_without_the_data_stack():
  """`cnnjax.train.steps` runs on a bare accelerator image (BENCHMARKS.md: no grain, TFDS or
  ml_collections there): device augmentation is imported only where a step uses it."""
  import subprocess
  import sys

  code = ("import sys, cnnjax.train.steps; "
          "print(sorted({'grain', 'tensorflow_datasets', 'ml_collections'} & set(sys.modules)))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True)
  assert out.stdout.strip() == "[]"
