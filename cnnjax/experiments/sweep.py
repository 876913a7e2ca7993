"""Sweeps: trials as data, each in its own subdirectory, resumable, failures recorded.

A trial is `Trial(name, overrides, info)`: `overrides` are dotted keys applied
to the experiment's base training config; `info` is whatever the report needs
(method, coefficients, …). Trial `k` runs in `workdir/trials/<k>-<name>/` with
its own config, checkpoints, metrics and `status.json`. Running a sweep again
skips finished trials, resumes interrupted ones from their checkpoints (the
training loop does that) and retries failed ones; a failure is recorded with
its error and the sweep goes on. A finished trial counts only while its saved
config is the one the sweep would train now: a changed experiment is an error
(`ConfigMismatchError`), not old results under new names.

A finished trial's results are the plain files at the top of its directory:
three small ones every trial has (`RECORD_FILES`) and whatever its experiment
keeps beside them (finetune's exported weights); `merge_finished` copies them
from one workdir into another, so machines
without shared storage can each run `--trial K` and pool what they finished,
and a sweep that spans several sessions can carry its finished trials along
without their checkpoints.

Each trial runs under its directory's lease (`cnnjax.lease`): a `--trial K`
process and a sweep, or two sweeps, never write one trial at once. Who runs
the trials is the launcher in force (`launching`): this process in order
(`launch.Local`, the default) or a Ray cluster at once (`launch.RayLauncher`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import pathlib
import time
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections

from cnnjax import fileio, lease
from cnnjax.experiments import launch, reports
from cnnjax.train.config import with_overrides as apply_overrides

log = logging.getLogger("cnnjax.experiments")

DONE, FAILED, RUNNING = "done", "failed", "running"
# What every finished trial has: status (with the result), config and training curve.
RECORD_FILES = ("config.json", "metrics.jsonl", "status.json")
ELSEWHERE = "running elsewhere"  # another process holds the trial's lease

_LAUNCHER = contextvars.ContextVar("cnnjax_launcher", default=None)


@contextlib.contextmanager
def launching(launcher):
  """Within the block, sweeps run their trials with `launcher` (default `launch.Local()`)."""
  token = _LAUNCHER.set(launcher)
  try:
    yield
  finally:
    _LAUNCHER.reset(token)


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: dict
  info: dict = dataclasses.field(default_factory=dict)


def trial_dir(workdir: pathlib.Path, index: int, trial: Trial) -> pathlib.Path:
  return workdir / "trials" / f"{index:03d}-{trial.name}"


def read_status(directory: pathlib.Path) -> dict | None:
  path = directory / "status.json"
  return json.loads(path.read_text()) if path.exists() else None


def _write_status(directory: pathlib.Path, status: dict) -> None:
  fileio.write_atomically(directory / "status.json", json.dumps(status, indent=1, default=str))


def run_trial(base: ml_collections.ConfigDict, workdir: pathlib.Path, index: int, trial: Trial,
              measure=None) -> dict:
  """Runs (or skips, when done) trial `index` under its directory's lease; its status record.

  `measure(config)` adds static facts about the trial's model (parameters,
  FLOPs) to the record; it runs before training so they exist even if training
  fails. Another live process on the trial raises `lease.WorkdirBusyError`
  before anything is written.
  """
  from cnnjax.train import train_and_evaluate  # noqa: PLC0415 - keeps `--list` light
  from cnnjax.train.checkpoint import DiskFullError  # noqa: PLC0415

  directory = trial_dir(workdir, index, trial)
  with lease.hold(directory):
    status = read_status(directory)
    if status is not None and status["status"] == DONE:
      return status
    record = {"index": index, "name": trial.name, "info": trial.info,
              "overrides": trial.overrides, "status": RUNNING,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "started_unix": time.time()}
    _write_status(directory, record)
    start = time.perf_counter()
    try:
      config = apply_overrides(base, trial.overrides)
      if measure is not None:
        record["measured"] = measure(config)
      result = train_and_evaluate(config, directory)
    except DiskFullError:
      raise  # every later trial would fail the same way; the trial resumes once there is space
    except Exception as error:  # noqa: BLE001 - a failing trial must not stop the sweep
      record.update(status=FAILED, error=f"{type(error).__name__}: {error}",
                    traceback=traceback.format_exc(), seconds=time.perf_counter() - start)
      log.error("trial %d (%s) failed: %s", index, trial.name, record["error"])
    else:
      # The machine travels with the record, since a merged trial was trained elsewhere. Read
      # after training: a multi-process trial must initialise jax.distributed before any device.
      record.update(status=DONE, result=result, seconds=time.perf_counter() - start,
                    machine=reports.machine())
    _write_status(directory, record)
    return record


@dataclasses.dataclass(frozen=True)
class _TrialRunner:
  """`run_trial` for one sweep, as a picklable callable of (index, trial) for any launcher."""
  base: ml_collections.ConfigDict
  workdir: pathlib.Path
  measure: Any = None

  def __call__(self, index: int, trial: Trial) -> dict:
    return run_trial(self.base, self.workdir, index, trial, self.measure)


def _placeholder(index: int, trial: Trial, status: str) -> dict:
  return {"index": index, "name": trial.name, "info": trial.info, "overrides": trial.overrides,
          "status": status}


def _finished_status(base: ml_collections.ConfigDict, directory: pathlib.Path,
                     trial: Trial) -> dict | None:
  """The trial's status record; a finished one must have been trained with today's config."""
  from cnnjax.train.loop import ConfigMismatchError, check_saved_config  # noqa: PLC0415

  status = read_status(directory)
  if status is not None and status["status"] == DONE:
    try:
      check_saved_config(apply_overrides(base, trial.overrides), directory)
    except ConfigMismatchError as error:
      raise ConfigMismatchError(f"finished trial {directory.name}: {error}") from None
  return status


def run_sweep(base: ml_collections.ConfigDict, workdir: pathlib.Path, trials: Sequence[Trial],
              only: int | None = None, measure=None, first_index: int = 0) -> list[dict]:
  """Runs every trial (or just `only`, here), returns every trial's status record in order."""
  runner = _TrialRunner(base, workdir, measure)
  records: dict[int, dict] = {}
  jobs = []
  for offset, trial in enumerate(trials):
    index = first_index + offset
    status = _finished_status(base, trial_dir(workdir, index, trial), trial)
    if only is not None and index != only:
      records[index] = status or _placeholder(index, trial, "pending")
    elif status is not None and status["status"] == DONE:
      records[index] = status
    else:
      jobs.append((index, trial))
  if only is not None:  # one trial, here; a busy one is the caller's error
    for index, trial in jobs:
      print(f"[trial {index}] {trial.name}", flush=True)
      records[index] = runner(index, trial)
  elif jobs:
    launcher = _LAUNCHER.get() or launch.Local()
    for (index, trial), record in zip(jobs, launcher.run(jobs, _ElsewhereTolerant(runner))):
      records[index] = record
  return [records[first_index + offset] for offset in range(len(trials))]


@dataclasses.dataclass(frozen=True)
class _ElsewhereTolerant:
  """A sweep skips a trial that another process (a `--trial K` run) is training now."""
  runner: _TrialRunner

  def __call__(self, index: int, trial: Trial) -> dict:
    try:
      return self.runner(index, trial)
    except lease.WorkdirBusyError as error:
      log.warning("trial %d (%s) skipped: %s", index, trial.name, error)
      return {**_placeholder(index, trial, ELSEWHERE), "error": str(error)}


@dataclasses.dataclass(frozen=True)
class Merged:
  """What `merge_finished` did, by trial directory name."""
  copied: list[str]
  kept: list[str]  # finished in both: the destination's record stays
  unfinished_here: list[str]  # the destination has its own attempt, left as it is


def record_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """A trial's records: the plain files at the top of its directory, but its lease.

  Checkpoints and TensorBoard logs are directories: a finished trial needs neither.
  """
  return sorted(p for p in directory.iterdir() if p.is_file() and p.name != lease.FILENAME)


def merge_finished(source: str | pathlib.Path, workdir: str | pathlib.Path) -> Merged:
  """Copies the records (`record_files`) of `source`'s finished trials into `workdir`.

  Only into trial directories that `workdir` does not have yet (or that are
  empty): nothing there is overwritten, neither a finished record nor an
  unfinished attempt with its checkpoints. Trials are matched by directory
  name (index and name); whether a copied trial's config is the one a sweep
  would train is checked when the sweep reads it. Checkpoints are not copied:
  a finished trial needs none.
  """
  source, workdir = pathlib.Path(source), pathlib.Path(workdir)
  if not (source / "trials").is_dir():
    raise FileNotFoundError(f"{source} has no trials/ directory: pass the workdir of a sweep "
                            "(the directory that holds trials/ and results.csv)")
  if source.resolve() == workdir.resolve():
    raise ValueError(f"cannot merge {source} into itself: pass another sweep's workdir")
  merged = Merged([], [], [])
  for directory in sorted(p for p in (source / "trials").iterdir() if p.is_dir()):
    status = read_status(directory)
    if status is None or status["status"] != DONE:
      continue
    missing = [n for n in RECORD_FILES if not (directory / n).is_file()]
    if missing:
      raise FileNotFoundError(f"finished trial {directory} lacks {', '.join(missing)}; "
                              "it cannot be merged")
    merged_as = _merge_trial(directory, workdir / "trials" / directory.name)
    getattr(merged, merged_as).append(directory.name)
  return merged


def _merge_trial(source: pathlib.Path, destination: pathlib.Path) -> str:
  """Copies one finished trial's records where the destination has none; which `Merged` list."""
  try:
    with lease.hold(destination):
      theirs = read_status(destination)
      if theirs is not None and theirs["status"] == DONE:
        return "kept"
      if any(p.name != lease.FILENAME for p in destination.iterdir()):
        return "unfinished_here"
      # status.json last: a merge cut short leaves a trial that does not read as finished.
      for path in sorted(record_files(source), key=lambda p: p.name == "status.json"):
        fileio.write_atomically(destination / path.name, path.read_bytes())
      return "copied"
  except lease.WorkdirBusyError:  # a live process is training it here
    return "unfinished_here"


def summary_rows(records: Sequence[dict], columns: Sequence[str]) -> list[dict[str, Any]]:
  """One flat row per trial: its info, measured facts and result, in `columns` order."""
  rows = []
  for record in records:
    flat = {"trial": record["index"], "name": record["name"], "status": record["status"],
            **record.get("info", {}), **record.get("measured", {})}
    result = record.get("result") or {}
    flat.update(accuracy=result.get("top1"), train_accuracy=result.get("train_accuracy"),
                train_seconds=result.get("train_seconds", record.get("seconds")),
                error=record.get("error"))
    rows.append({c: flat.get(c) for c in columns})
  return rows
