"""Training from pretrained weights: `config.init_from`, `config.freeze_body`, resume."""

from __future__ import annotations

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import cnnjax
from cnnjax import train
from cnnjax.train.config import with_overrides

# A narrow ResNet-18 on the embedded digits at 16 px.
OVERRIDES = {"width": 4}
TINY = {"model": "resnet18", "model_overrides.width": 4, "data.image_size": 16,
        "data.train_crop": "pad_crop", "data.pad": 2, "data.mean": [0.5], "data.std": [0.5],
        "data.flip": False, "batch_size": 16, "optimizer.schedule": "constant",
        "optimizer.learning_rate": 0.05, "progress_bar": False, "fast_compile": True,
        "tensorboard": False, "async_checkpoint": False}


def _pretrained(path, seed, num_classes=1000):
  """An "ImageNet" checkpoint: random variables of a 1000-class model in torchvision's names."""
  model = cnnjax.create_model("resnet18", num_classes=num_classes, **OVERRIDES)
  variables = model.init(jax.random.key(seed), np.zeros((1, 16, 16, 3), np.float32))
  # BatchNorm statistics that are not the init's zeros and ones.
  stats = jax.tree.map(lambda x: x + 0.3 * np.random.default_rng(seed).random(x.shape),
                       variables["batch_stats"])
  variables = {"params": variables["params"], "batch_stats": stats}
  cnnjax.save_weights("resnet18", variables, path, overwrite=True, **OVERRIDES)
  return cnnjax.load_weights("resnet18", path, **OVERRIDES)


def _final_state(workdir):
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(steps[-1]) / "state")
  return steps[-1], state


def _config(data_dir, **overrides):
  return with_overrides(train.default_config(), {**TINY, "data.data_dir": str(data_dir),
                                                 **overrides})


def _body(tree):
  return {k: v for k, v in tree.items() if k != "fc"}


def test_a_run_starts_from_the_weights_with_a_new_head(digits_data_dir, tmp_path):
  loaded = _pretrained(tmp_path / "imagenet.safetensors", seed=1)
  config = _config(digits_data_dir, init_from=str(tmp_path / "imagenet.safetensors"),
                   num_steps=1, **{"optimizer.learning_rate": 1e-9, "optimizer.weight_decay": 0.0,
                                   "optimizer.momentum": 0.0})
  train.train_and_evaluate(config, tmp_path / "run")
  _, state = _final_state(tmp_path / "run")
  # One step at a negligible rate: the body is the checkpoint's, the head is new (10 classes).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               _body(state["params"]), _body(loaded["params"]))
  assert state["params"]["fc"]["kernel"].shape == (32, 10)


def test_freeze_body_trains_only_the_head_and_keeps_the_statistics(digits_data_dir, tmp_path):
  loaded = _pretrained(tmp_path / "imagenet.safetensors", seed=2)
  config = _config(digits_data_dir, init_from=str(tmp_path / "imagenet.safetensors"),
                   freeze_body=True, num_steps=4,
                   **{"optimizer.weight_decay_mode": "decoupled", "optimizer.name": "adamw",
                      "optimizer.learning_rate": 1e-2, "optimizer.weight_decay": 0.1})
  result = train.train_and_evaluate(config, tmp_path / "run")
  assert np.isfinite(result["train_loss"])
  _, state = _final_state(tmp_path / "run")
  jax.tree.map(np.testing.assert_array_equal, _body(state["params"]), _body(loaded["params"]))
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], loaded["batch_stats"])
  fresh = cnnjax.load_weights("resnet18", tmp_path / "imagenet.safetensors", num_classes=10,
                              seed=0, **OVERRIDES)
  assert not np.allclose(state["params"]["fc"]["kernel"], fresh["params"]["fc"]["kernel"])


def test_resume_comes_from_the_runs_checkpoints_not_the_weights(digits_data_dir, tmp_path):
  weights_path = tmp_path / "imagenet.safetensors"
  _pretrained(weights_path, seed=3)
  config = _config(digits_data_dir, init_from=str(weights_path), num_steps=4)
  train.train_and_evaluate(config, tmp_path / "whole")
  train.train_and_evaluate(_config(digits_data_dir, init_from=str(weights_path), num_steps=4,
                                   stop_after_steps=2), tmp_path / "parts")
  _pretrained(weights_path, seed=4)  # the file changes between the two invocations
  train.train_and_evaluate(config, tmp_path / "parts")
  (step_a, whole), (step_b, parts) = _final_state(tmp_path / "whole"), _final_state(tmp_path / "parts")
  assert step_a == step_b == 4
  jax.tree.map(np.testing.assert_array_equal, parts["params"], whole["params"])


def test_bad_fine_tuning_settings_are_named(digits_data_dir, tmp_path):
  with pytest.raises(ValueError, match="freeze_body .* set config.init_from"):
    train.train_and_evaluate(_config(digits_data_dir, freeze_body=True, num_steps=1), tmp_path / "a")
  with pytest.raises(cnnjax.weights.WeightsError, match="no weights file"):
    train.train_and_evaluate(_config(digits_data_dir, init_from=str(tmp_path / "absent.pth"),
                                     num_steps=1), tmp_path / "b")
