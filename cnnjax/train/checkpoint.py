"""Checkpoints in a run's workdir with Orbax, and resuming from the newest good one.

A checkpoint holds the train state and a JSON record of what resuming needs
besides it (data-iterator position, config). Orbax's manager keeps the last N
(and optionally the best by a metric) and saves asynchronously. Orbax has no
fallback when the newest step is unreadable: `restore_latest` walks back to the
newest readable step, warning about each bad one, and deletes nothing. Given a
`quarantine` directory it moves the bad steps there (so that the resumed run
can write those step numbers again) — moved, never deleted.

`Checkpoints` is what a training run writes through. It survives the two
ways a long run on shared, preemptible machines loses a save:

- A process suspended (SIGSTOP, a paused VM, a Slurm suspend) in the middle of
  an asynchronous commit outlives Orbax's commit timeout, which counts
  wall-clock time: the commit fails when the process continues, though
  nothing is wrong. That save is reported, and the next one (or, at the end,
  `finish`'s fallback) writes the state again, so the run goes on.
- A write that fails for lack of space raises `DiskFullError`, naming the
  directory, the bytes the state needs and the bytes free; the unfinished
  temporary directory is removed, and the previous checkpoint stays the newest
  readable one for the rerun.
"""

from __future__ import annotations

import errno
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


class DiskFullError(OSError):
  """A checkpoint could not be written for lack of space; the previous one is intact."""


def make_manager(directory: str | pathlib.Path, max_to_keep: int = 3,
                 best_metric: str | None = None, best_mode: str = "max",
                 async_save: bool = True,
                 commit_timeout_seconds: int | None = None) -> ocp.CheckpointManager:
  async_options = ocp.AsyncOptions(**({"timeout_secs": commit_timeout_seconds}
                                      if commit_timeout_seconds else {}))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
      best_mode=best_mode,
      keep_checkpoints_without_metrics=True,
      enable_async_checkpointing=async_save,
      async_options=async_options,
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


def _is_disk_full(error: BaseException | None) -> bool:
  """ENOSPC, as an OSError or inside the text of TensorStore's error (Orbax raises ValueError)."""
  while error is not None:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    text = str(error)
    if "No space left on device" in text or "os_error_code='28'" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


def state_bytes(state: Any) -> int:
  """The bytes of every array in `state`: what a checkpoint of it needs at most (uncompressed)."""
  return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(state))


def _megabytes(count: int) -> str:
  return f"{count / 2**20:,.1f} MiB"


class Checkpoints:
  """A run's checkpoint directory: saves that survive suspends and fail clearly on a full disk.

  `save` writes asynchronously when the manager does (`wait=True`: synchronously, as a
  preempted run must); `finish` waits for the last write. Both return whether every save so
  far committed: False means one timed out (the process was suspended during its commit,
  say), and the caller saves its current state again.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self.directory = pathlib.Path(manager.directory)
    # (step, bytes) of the save whose asynchronous commit may be in flight.
    self._pending: tuple[int, int] | None = None

  def save(self, step: int, state: Any, extra: dict, metrics: dict | None = None,
           wait: bool = False) -> bool:
    committed = self._wait()
    if step in self.manager.all_steps():
      return committed
    self._remove_unfinished(step)  # this step's commit that timed out, if any
    nbytes = state_bytes(state)
    try:
      save(self.manager, step, state, extra, metrics)
    except Exception as error:  # noqa: BLE001 - only a full disk is translated
      self._raise_if_disk_full(error, step, nbytes)
      raise
    self._pending = (step, nbytes)
    if wait:
      committed = self._wait() and committed
    return committed

  def finish(self) -> bool:
    return self._wait()

  def _wait(self) -> bool:
    if self._pending is None:
      return True
    (step, nbytes), self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except TimeoutError as error:
      log.warning("the checkpoint of step %s in %s did not commit within Orbax's timeout (%s); "
                  "was the process suspended? It is written again", step, self.directory, error)
      return False
    except Exception as error:  # noqa: BLE001 - only a full disk is translated
      self._raise_if_disk_full(error, step, nbytes)
      raise
    return True

  def _raise_if_disk_full(self, error: BaseException, step: int, nbytes: int) -> None:
    if not _is_disk_full(error):
      return
    self._remove_unfinished(step)  # give its space back
    self.manager.reload()
    kept = self.manager.latest_step()
    free = _megabytes(shutil.disk_usage(self.directory).free)
    previous = (f"the checkpoint of step {kept} is kept and readable"
                if kept is not None else "no earlier checkpoint exists")
    raise DiskFullError(
        errno.ENOSPC,
        f"no space left in {self.directory} for the checkpoint of step {step}: it needs up to "
        f"{_megabytes(nbytes)} ({nbytes:,} bytes, the train state), {free} are free; "
        f"{previous}. Free space there and rerun the same command to resume") from error

  def _remove_unfinished(self, step: int) -> None:
    """Orbax's temporary directory of an unfinished write of `step` (never a committed one)."""
    for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
      shutil.rmtree(partial, ignore_errors=True)
