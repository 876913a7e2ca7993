"""Preemption: a signal asks a run to save and stop; the rerun of the same command resumes.

Preemptible capacity (spot and preemptible VMs, TPU VMs, Slurm's `--signal`
and requeue, Kubernetes eviction) warns a job with a signal and a grace period
of about 30 s. While `watch()` is in force, SIGTERM, SIGINT and SIGUSR1 (the
default `SIGNALS`) only record the request; the training loop asks
`should_save(step)` after every step, writes a checkpoint synchronously at the
first step where it is true, logs `preempted at step N; rerun the same command
to resume`, and raises `Preempted`, a `SystemExit` with `EXIT_CODE` (75,
sysexits' EX_TEMPFAIL: "try again later"), which a scheduler can requeue on:

- Slurm: `#SBATCH --signal=B:USR1@60 --requeue`, and in the batch script
  `trap 'kill -USR1 $pid' USR1` forwarding to the job step, then
  `[ $? -eq 75 ] && scontrol requeue $SLURM_JOB_ID`.
- Kubernetes: a Job's `podFailurePolicy` rule `onExitCodes: {operator: In, values: [75]}`
  with `action: Ignore` retries the pod without counting a failure.

Several processes must save at the same step: after `jax.distributed.initialize`
the decision is JAX's preemption sync point (`reached_preemption_sync_point`),
whose coordination service picks one step that every process reaches. JAX's
own notifier listens for SIGTERM, so here SIGTERM is left to it and the other
signals are forwarded to it as SIGTERM.

A second signal while a request is pending ends the process at once with the
same exit code: Orbax writes a checkpoint into a temporary directory and
renames it when complete, so the previous checkpoint stays the newest readable
one. `watch(())` (`config.save_on_signals = ()`) leaves every signal alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

import jax

log = logging.getLogger("cnnjax.train")

EXIT_CODE = 75
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preempted(SystemExit):
  """The run saved at `step` (None: between trials, nothing to save) and stopped on a signal.

  A `SystemExit`: uncaught, it ends a script with `EXIT_CODE` and no traceback,
  and a sweep's `except Exception` does not record it as a failed trial.
  """

  def __init__(self, step: int | None, signal_name: str | None):
    super().__init__(EXIT_CODE)
    self.step = step
    self.signal_name = signal_name

  def __str__(self) -> str:
    where = f"at step {self.step}" if self.step is not None else "before the next trial"
    return f"preempted {where}; rerun the same command to resume"


_lock = threading.Lock()
_depth = 0
_previous: dict[int, object] = {}
_received: str | None = None


def requested() -> str | None:
  """The name of the signal that asked this process to stop, or None."""
  return _received


def _multi_process() -> bool:
  return jax.process_count() > 1 and jax.distributed.is_initialized()


def _handle(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
  global _received
  name = signal.Signals(signum).name
  if _received is not None:
    os.write(2, f"{name} again while saving for preemption: exiting now; the newest complete "
                f"checkpoint is kept\n".encode())
    os._exit(EXIT_CODE)
  _received = name
  os.write(2, f"{name} received: saving after the current step\n".encode())
  if _multi_process() and signum != signal.SIGTERM:
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier listens for SIGTERM


@contextlib.contextmanager
def watch(signals=SIGNALS):
  """While in force, `signals` request a save and stop instead of ending the process.

  Re-entrant (a sweep's watch holds over its trials' loops). Outside the main thread,
  where Python cannot take signals, it watches nothing.
  """
  global _depth, _received
  names = tuple(signals)
  unknown = [n for n in names if n not in SIGNALS]
  if unknown:
    raise ValueError(f"config.save_on_signals takes names from {SIGNALS} (or () for none), "
                     f"got {unknown}")
  active = bool(names) and threading.current_thread() is threading.main_thread()
  with _lock:
    if active and _depth == 0:
      _received = None
      for name in names:
        signum = getattr(signal, name)
        if name == "SIGTERM" and _multi_process():
          continue  # JAX's notifier has it
        _previous[signum] = signal.signal(signum, _handle)
    if active:
      _depth += 1
  try:
    yield
  finally:
    if active:
      with _lock:
        _depth -= 1
        if _depth == 0:
          for signum, handler in _previous.items():
            signal.signal(signum, handler)
          _previous.clear()
          _received = None  # a request belongs to the run that watched for it


def should_save(step: int) -> bool:
  """Whether the run must save at `step` and stop; the same answer in every process."""
  if _multi_process():
    from jax.experimental import multihost_utils  # noqa: PLC0415

    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
      return _received is not None
  return _received is not None


def stop(step: int | None) -> Preempted:
  """The exception that ends the run, after logging the line a user and a scheduler read."""
  error = Preempted(step, _received)
  print(str(error), file=sys.stderr, flush=True)
  return error
