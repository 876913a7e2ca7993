"""Checkpoints: round trip, fallback past a corrupt newest step, nothing deleted."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax.train import checkpoint


def _state(value):
  return {"params": {"w": jnp.full((3, 2), value, jnp.float32)}, "step": jnp.asarray(int(value))}


def _corrupt(step_dir: pathlib.Path):
  for path in step_dir.rglob("*"):
    if path.is_file() and "state" in path.parts:
      path.write_bytes(b"\x00garbage")


def test_round_trip_and_fallback_to_the_newest_good_step(tmp_path):
  manager = checkpoint.make_manager(tmp_path, max_to_keep=3, async_save=False)
  for step in (1, 2):
    checkpoint.save(manager, step, _state(float(step)), {"epoch": step, "position": step * 10})
  manager.wait_until_finished()
  target = checkpoint.abstract_like(_state(0.0))
  step, state, extra = checkpoint.restore_latest(manager, target)
  assert step == 2 and extra == {"epoch": 2, "position": 20}
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 2.0))

  _corrupt(tmp_path / "2")
  with pytest.warns(UserWarning, match="step 2 .* cannot be restored"):
    step, state, extra = checkpoint.restore_latest(manager, target)
  assert step == 1 and extra["position"] == 10
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 1.0))
  assert (tmp_path / "2").exists()  # the bad checkpoint is kept for inspection

  _corrupt(tmp_path / "1")
  with pytest.warns(UserWarning), pytest.raises(checkpoint.NoUsableCheckpointError,
                                                match="nothing was deleted"):
    checkpoint.restore_latest(manager, target)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["1", "2"]


def test_empty_directory_means_a_fresh_start(tmp_path):
  manager = checkpoint.make_manager(tmp_path / "ckpt", async_save=False)
  assert checkpoint.restore_latest(manager, checkpoint.abstract_like(_state(0.0))) is None


def test_quarantine_moves_unreadable_steps_aside_and_frees_their_numbers(tmp_path):
  manager = checkpoint.make_manager(tmp_path / "ckpt", max_to_keep=3, async_save=False)
  for step in (1, 2):
    checkpoint.save(manager, step, _state(float(step)), {"position": step})
  _corrupt(tmp_path / "ckpt" / "2")
  target = checkpoint.abstract_like(_state(0.0))
  with pytest.warns(UserWarning):
    step, _, _ = checkpoint.restore_latest(manager, target, quarantine=tmp_path / "bad")
  assert step == 1 and manager.all_steps() == [1]
  moved = list((tmp_path / "bad").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("2-") and any(moved[0].rglob("*"))
  checkpoint.save(manager, 2, _state(5.0), {"position": 2})  # the step number is free again
  manager.wait_until_finished()
  assert checkpoint.restore_latest(manager, target)[0] == 2


def test_a_full_disk_is_one_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
  """ENOSPC as TensorStore reports it (Orbax raises ValueError with the OS error's text);
  tests/test_train_loop.py fills a real small filesystem."""
  saver = checkpoint.Checkpoints(checkpoint.make_manager(tmp_path, 2, async_save=False))
  saver.save(1, _state(1.0), {"step": 1})
  partial = tmp_path / "2.orbax-checkpoint-tmp-123"

  def no_space(manager, step, state, extra, metrics=None):
    partial.mkdir()  # what a write that ran out of space leaves
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 1546519 bytes to '
                     "file 14: No space left on device [os_error_code='28']")

  monkeypatch.setattr(checkpoint, "save", no_space)
  with pytest.raises(checkpoint.DiskFullError) as raised:
    saver.save(2, _state(2.0), {"step": 2})
  message = str(raised.value)
  assert raised.value.errno == 28
  assert f"no space left in {tmp_path} for the checkpoint of step 2" in message
  assert "it needs up to 0.0 MiB (28 bytes, the train state)" in message
  assert "the checkpoint of step 1 is kept and readable" in message and "rerun" in message
  assert not partial.exists()
  step, restored, extra = checkpoint.restore_latest(saver.manager, _state(0.0))
  assert step == 1 and extra == {"step": 1}
  np.testing.assert_array_equal(restored["params"]["w"], np.full((3, 2), 1.0))


def test_other_write_errors_pass_through_unchanged(tmp_path, monkeypatch):
  saver = checkpoint.Checkpoints(checkpoint.make_manager(tmp_path, 2, async_save=False))
  monkeypatch.setattr(checkpoint, "save", lambda *a, **k: (_ for _ in ()).throw(
      PermissionError(13, "Permission denied")))
  with pytest.raises(PermissionError):
    saver.save(1, _state(1.0), {"step": 1})
