"""Checkpoints in a run's workdir with Orbax, and resuming from the newest good one.

A checkpoint holds the train state and a JSON record of what resuming needs
besides it (data-iterator position, config). Orbax's manager keeps the last N
(and optionally the best by a metric) and saves asynchronously. Orbax has no
fallback when the newest step is unreadable: `restore_latest` walks back to the
newest readable step, warning about each bad one, and deletes nothing. Given a
`quarantine` directory it moves the bad steps there (so that the resumed run
can write those step numbers again) — moved, never deleted.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import time
import warnings
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class NoUsableCheckpointError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


def make_manager(directory: str | pathlib.Path, max_to_keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "max",
                 async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
      best_mode=best_mode,
      keep_checkpoints_without_metrics=True,
      enable_async_checkpointing=async_save,
      create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, extra: dict,
         metrics: dict | None = None) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             extra=ocp.args.JsonSave(extra)),
               metrics=metrics)


def abstract_like(state: Any) -> Any:
  """Shapes, dtypes and shardings of `state`: the restore target (any device count)."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def restore_latest(manager: ocp.CheckpointManager, target: Any,
                   quarantine: str | pathlib.Path | None = None) -> tuple[int, Any, dict] | None:
  """(step, state, extra) from the newest readable checkpoint, None if there is none.

  `target` is an abstract state carrying the shardings to restore onto, so a
  checkpoint written on one device count restores onto another. Unreadable
  steps newer than the restored one are moved into `quarantine` when given.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  failures = []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), extra=ocp.args.JsonRestore()))
    except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
      failures.append(f"step {step}: {type(error).__name__}: {error}")
      warnings.warn(f"checkpoint at step {step} in {manager.directory} cannot be restored "
                    f"({type(error).__name__}); trying the one before it. It is left in place.",
                    stacklevel=2)
      continue
    bad = [s for s in steps if s > step]
    if quarantine is not None and bad:
      _quarantine(manager, bad, pathlib.Path(quarantine))
    return step, restored["state"], dict(restored["extra"])
  raise NoUsableCheckpointError(
      f"none of the {len(steps)} checkpoints in {manager.directory} can be restored; nothing was "
      "deleted. Move the directory aside to start afresh, or fix the files. Errors:\n  "
      + "\n  ".join(failures))


def _quarantine(manager: ocp.CheckpointManager, bad_steps: list[int], into: pathlib.Path) -> None:
  if jax.process_index() == 0:
    into.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for step in bad_steps:
      source = pathlib.Path(manager.directory) / str(step)
      if source.exists():
        destination = into / f"{step}-{stamp}"
        shutil.move(str(source), str(destination))
        warnings.warn(f"moved the unreadable checkpoint {source} to {destination}", stacklevel=3)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415

    multihost_utils.sync_global_devices("cnnjax: quarantined checkpoints")
  manager.reload()
