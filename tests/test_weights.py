"""Pretrained weights: PyTorch logits from committed reference files, round trips and bad input.

The references (`tests/reference/weights/`, written by `make_weights.py` there
with torchvision and timm) are reduced-width twins of one model per family
with randomised BatchNorm statistics; PyTorch is not needed here. The full-size
check of every model against PyTorch is `make test-torch`
(tests/test_weights_torch.py).
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib

import jax
import numpy as np
import pytest

import cnnjax
from cnnjax import weights
from cnnjax.weights import WeightsError, layouts

REFERENCE = pathlib.Path(__file__).parent / "reference" / "weights"
INDEX = json.loads((REFERENCE / "index.json").read_text())
KEYS = [k for k in INDEX if not k.startswith("_")]
TOLERANCE = 1e-4  # of the largest logit


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _entry(key):
  entry = INDEX[key]
  overrides = {k: _tuples(v) for k, v in entry["overrides"].items()}
  return entry["model"], overrides, entry["num_classes"]


@functools.lru_cache(maxsize=None)
def _apply(name, overrides, num_classes):
  model = cnnjax.create_model(name, num_classes=num_classes, **dict(overrides))
  return jax.jit(lambda variables, x: model.apply(variables, x))


def _logits(key, variables):
  name, overrides, num_classes = _entry(key)
  expected = np.load(REFERENCE / f"{key}.logits.npz")
  got = np.asarray(_apply(name, tuple(sorted(overrides.items())), num_classes)(
      variables, expected["images"]))
  return got, expected["logits"]


def _relative_error(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def _load(key, source, **kwargs):
  name, overrides, num_classes = _entry(key)
  return weights.load_weights(name, source, num_classes=num_classes, **overrides, **kwargs)


def _state(key):
  return weights.read_safetensors(REFERENCE / f"{key}.safetensors")


def test_every_family_has_a_reference():
  families = {cnnjax.model_info(INDEX[k]["model"]).family for k in KEYS}
  assert families == set(layouts.LAYOUTS)


@pytest.mark.parametrize("key", KEYS)
def test_logits_equal_pytorch_from_safetensors_npz_and_a_mapping(key, tmp_path):
  path = REFERENCE / f"{key}.safetensors"
  got, want = _logits(key, _load(key, path))
  assert _relative_error(got, want) < TOLERANCE
  # The same state dict as .npz and as an in-memory mapping loads the same values.
  np.savez(tmp_path / "w.npz", **_state(key))
  for source in (tmp_path / "w.npz", dict(_state(key))):
    other, _ = _logits(key, _load(key, source))
    np.testing.assert_array_equal(other, got)


@pytest.mark.parametrize("key", KEYS)
def test_save_weights_writes_the_reference_state_dict_back(key, tmp_path):
  name, overrides, _ = _entry(key)
  variables = _load(key, REFERENCE / f"{key}.safetensors")
  written = weights.save_weights(name, variables, tmp_path / "out.safetensors", **overrides)
  original, saved = _state(key), weights.read_safetensors(written)
  if name == "googlenet":  # torchvision's checkpoint may carry aux heads; this one has none
    assert not any(k.startswith("aux") for k in original)
  # The same keys, layouts and values: PyTorch loads it into the same network.
  assert sorted(saved) == sorted(original)
  for k, value in original.items():
    if k.endswith(layouts.BATCHES_TRACKED):
      assert saved[k].dtype == np.int64 and saved[k].shape == ()
    else:
      np.testing.assert_array_equal(saved[k], value, err_msg=k)
  # And it loads back into cnnjax with the same logits.
  again, want = _logits(key, _load(key, written))
  assert _relative_error(again, want) < TOLERANCE


def test_safetensors_writer_and_reader_agree_with_the_specification(tmp_path):
  tensors = {"b": np.arange(6, dtype=np.float16).reshape(2, 3),
             "a": np.array(3, np.int64), "c": np.ones((0, 4), np.float32),
             "d": np.asarray([1.5, -2], dtype=jax.numpy.bfloat16)}
  path = tmp_path / "t.safetensors"
  weights.write_safetensors(path, tensors, {"k": "v"})
  data = path.read_bytes()
  size = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + size])
  assert (8 + size) % 8 == 0  # the header is padded so the data is aligned
  assert header["__metadata__"] == {"k": "v"}
  assert header["a"] == {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}
  assert header["d"]["dtype"] == "BF16"
  read = weights.read_safetensors(path)
  for key, value in tensors.items():
    assert read[key].dtype == value.dtype
    np.testing.assert_array_equal(read[key], value)


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
  data = (REFERENCE / "resnet18.safetensors").read_bytes()
  for size in (len(data) - 1, len(data) // 2, 100, 5):
    path = tmp_path / f"cut{size}.safetensors"
    path.write_bytes(data[:size])
    with pytest.raises(WeightsError, match="not a complete safetensors file"):
      _load("resnet18", path)
  npz = tmp_path / "cut.npz"
  np.savez(npz, **_state("resnet18"))
  npz.write_bytes(npz.read_bytes()[:1000])
  with pytest.raises(WeightsError, match="truncated or damaged"):
    _load("resnet18", npz)
  with pytest.raises(WeightsError, match="unknown weights format '.h5'"):
    (tmp_path / "w.h5").write_bytes(b"x")
    _load("resnet18", tmp_path / "w.h5")
  with pytest.raises(WeightsError, match="no weights file"):
    _load("resnet18", tmp_path / "absent.safetensors")


def test_pytorch_files_without_torch_say_how_to_convert(tmp_path):
  try:
    import torch  # noqa: F401
  except ImportError:
    pass
  else:
    pytest.skip("torch is installed here: tests/test_weights_torch.py reads .pth files")
  path = tmp_path / "resnet18.pth"
  path.write_bytes(b"PK")
  with pytest.raises(WeightsError, match="needs PyTorch.*convert the file to safetensors"):
    _load("resnet18", path)


def test_another_architecture_is_refused_with_both_key_sets():
  with pytest.raises(WeightsError, match=r"none of the .* keys .* densenet121 key.*another "
                                         r"architecture"):
    weights.load_weights("densenet121", _state("resnet18"))


def test_missing_unexpected_and_misshapen_keys_are_named_and_nothing_loads():
  state = dict(_state("resnet18"))
  del state["layer2.0.bn1.running_var"]
  state["layer9.0.conv1.weight"] = np.zeros((4, 4, 3, 3), np.float32)
  state["layer1.0.conv2.weight"] = np.zeros((4, 4, 5, 5), np.float32)
  with pytest.raises(WeightsError) as error:
    _load("resnet18", state)
  message = str(error.value)
  assert "nothing was loaded" in message
  assert "missing keys (1): layer2.0.bn1.running_var (shape (8,))" in message
  assert "unexpected keys (1): layer9.0.conv1.weight (shape (4, 4, 3, 3))" in message
  assert "layer1.0.conv2.weight: checkpoint (4, 4, 5, 5), resnet18 expects (4, 4, 3, 3)" in message


def test_another_depth_is_a_shape_or_key_error_not_a_partial_load():
  with pytest.raises(WeightsError, match="missing keys"):
    name, overrides, num_classes = _entry("resnet18")
    weights.load_weights("resnet34", _state("resnet18"), num_classes=num_classes,
                         width=overrides["width"])


def test_a_different_class_count_needs_num_classes_and_then_gets_a_fresh_head(caplog):
  name, overrides, _ = _entry("resnet18")
  with pytest.raises(WeightsError, match=r"fc.weight: checkpoint \(10, 32\), resnet18 expects "
                                         r"\(1000, 32\).*pass num_classes="):
    weights.load_weights(name, _state("resnet18"), **overrides)
  loaded = _load("resnet18", _state("resnet18"))
  with caplog.at_level(logging.WARNING, "cnnjax.weights"):
    fresh = weights.load_weights(name, _state("resnet18"), num_classes=3, seed=1, **overrides)
  assert "initialised afresh for 3 classes" in caplog.text and "fc.weight" in caplog.text
  assert fresh["params"]["fc"]["kernel"].shape == (32, 3)
  assert np.abs(np.asarray(fresh["params"]["fc"]["kernel"])).max() > 0
  body = lambda v: {k: x for k, x in v["params"].items() if k != "fc"}  # noqa: E731
  jax.tree.map(np.testing.assert_array_equal, body(fresh), body(loaded))
  jax.tree.map(np.testing.assert_array_equal, fresh["batch_stats"], loaded["batch_stats"])
  # A checkpoint saved without its classifier (a feature extractor) loads the same way.
  headless = {k: v for k, v in _state("resnet18").items() if not k.startswith("fc.")}
  again = weights.load_weights(name, headless, num_classes=3, seed=1, **overrides)
  jax.tree.map(np.testing.assert_array_equal, again, fresh)
  # The fresh head is the model's own initialiser: the init of a 3-class model with that seed.
  model = cnnjax.create_model(name, num_classes=3, **overrides)
  own = model.init(jax.random.key(1), np.zeros((1, 32, 32, 3), np.float32))
  np.testing.assert_allclose(fresh["params"]["fc"]["kernel"], own["params"]["fc"]["kernel"])
  np.testing.assert_allclose(fresh["params"]["fc"]["bias"], own["params"]["fc"]["bias"])


def test_wrappers_prefixes_and_legacy_names_are_recognised():
  state = _state("densenet121")
  # torchvision's published DenseNet files write "norm.1"; DataParallel prefixes "module.".
  legacy = {}
  for key, value in state.items():
    for old, new in ((".norm1.", ".norm.1."), (".conv1.", ".conv.1."), (".norm2.", ".norm.2."),
                     (".conv2.", ".conv.2.")):
      if "denselayer" in key and old in key:
        key = key.replace(old, new)
    legacy["module." + key] = value
  assert any(".norm.1." in k for k in legacy)
  got, want = _logits("densenet121", _load("densenet121", {"state_dict": legacy}))
  assert _relative_error(got, want) < TOLERANCE


def test_googlenet_drops_torchvision_aux_heads_only_when_it_has_none():
  name, overrides, num_classes = _entry("googlenet")
  state = dict(_state("googlenet"))
  state["aux1.fc2.weight"] = np.zeros((10, 1024), np.float32)
  got, want = _logits("googlenet", _load("googlenet", state))
  assert _relative_error(got, want) < TOLERANCE
  state["aux3.fc2.weight"] = np.zeros((10, 1024), np.float32)
  with pytest.raises(WeightsError, match=r"unexpected keys \(1\): aux3.fc2.weight"):
    _load("googlenet", state)
  # With its aux heads the model needs them: a checkpoint without them is refused.
  with pytest.raises(WeightsError, match="missing keys.*aux1.conv.conv.weight"):
    weights.load_weights(name, _state("googlenet"), num_classes=num_classes, aux_logits=True,
                         **overrides)


def test_timm_and_torchvision_names_of_mobilenet_v2_load_the_same_network():
  name, overrides, num_classes = _entry("mobilenet_v2")
  model = cnnjax.create_model(name, num_classes=num_classes)
  variables = _load("mobilenet_v2", REFERENCE / "mobilenet_v2.safetensors")
  shapes = weights._shapes(model, name)
  timm_layout = layouts.LAYOUTS["mobilenet_v2"][1]
  names = weights.torch_names(model, name, timm_layout, shapes)
  flat = {tuple(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(variables)}
  timm_state = {key: layouts.to_torch(flat[path]) for path, key in names.items()}
  assert "blocks.1.0.conv_pwl.weight" in timm_state and "conv_stem.weight" in timm_state
  again = weights.load_weights(name, timm_state, num_classes=num_classes)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_models_without_a_reference_layout_say_so():
  with pytest.raises(WeightsError, match="'resnet20' .* no torchvision or timm counterpart"):
    weights.load_weights("resnet20", {"conv.weight": np.zeros(1)})


def test_bad_sources_are_named():
  with pytest.raises(WeightsError, match="a path or a mapping"):
    weights.load_weights("resnet18", 3)
  with pytest.raises(WeightsError, match="entry 'x' is a str, not a tensor"):
    weights.load_weights("resnet18", {"x": "y"})


def test_save_weights_keeps_existing_files_and_checks_the_variables(tmp_path):
  name, overrides, _ = _entry("resnet18")
  variables = _load("resnet18", REFERENCE / "resnet18.safetensors")
  path = tmp_path / "w.safetensors"
  path.write_bytes(b"mine")
  with pytest.raises(FileExistsError, match="keeps it.*overwrite=True"):
    weights.save_weights(name, variables, path, **overrides)
  assert path.read_bytes() == b"mine"
  weights.save_weights(name, variables, path, overwrite=True, **overrides)
  assert path.read_bytes() != b"mine"
  with pytest.raises(WeightsError, match=r"not the variables of resnet18.*bn1/mean: shape \(4,\), resnet18 has \(64,\)"):
    weights.save_weights(name, variables, tmp_path / "x.safetensors")  # forgot width=4
  with pytest.raises(WeightsError, match=r"\*.safetensors"):
    weights.save_weights(name, variables, tmp_path / "x.pth", **overrides)


def test_load_and_save_are_the_top_level_api():
  assert cnnjax.load_weights is weights.load_weights
  assert cnnjax.save_weights is weights.save_weights


@pytest.mark.parametrize("key", ["resnet50", "efficientnet"])
def test_the_references_would_show_a_statistic_left_unmapped(key):
  """Each BatchNorm statistic is far enough from its default that forgetting one shows."""
  variables = _load(key, REFERENCE / f"{key}.safetensors")
  got, want = _logits(key, variables)
  assert _relative_error(got, want) < TOLERANCE
  stats = variables["batch_stats"]
  for leaf, default in (("mean", np.zeros_like), ("var", np.ones_like)):
    for module in list(stats)[:3] + list(stats)[-3:]:
      node = stats[module]
      while leaf not in node:  # a block's first norm
        node = node[next(iter(node))]
      broken = jax.tree.map(lambda x: x, variables)
      target = broken["batch_stats"][module]
      while leaf not in target:
        target = target[next(iter(target))]
      target[leaf] = default(np.asarray(target[leaf]))
      error = _relative_error(_logits(key, broken)[0], want)
      assert error > 100 * TOLERANCE, (module, leaf, error)
