"""cnnjax.train.preemption in this process: handlers in force only while watched, the opt-out,
bad signal names. Whole runs preempted by real signals: tests/test_train_loop.py (one and two
processes), tests/test_experiments.py (a sweep), tests/test_ray.py (a Ray worker)."""

import os
import signal

import pytest

from cnnjax.train import preemption


def test_a_signal_while_watched_is_recorded_not_fatal_and_the_handlers_come_back():
  before = {name: signal.getsignal(getattr(signal, name)) for name in preemption.SIGNALS}
  with preemption.watch():
    with preemption.watch():  # nested (a sweep around a trial): one installation
      assert preemption.requested() is None and not preemption.should_save(3)
      os.kill(os.getpid(), signal.SIGUSR1)
      assert preemption.requested() == "SIGUSR1" and preemption.should_save(3)
    assert preemption.requested() == "SIGUSR1"
    stopped = preemption.stop(7)
  assert isinstance(stopped, SystemExit) and stopped.code == preemption.EXIT_CODE == 75
  assert str(stopped) == "preempted at step 7; rerun the same command to resume"
  assert preemption.requested() is None  # nothing leaks into the next run in this process
  assert {name: signal.getsignal(getattr(signal, name)) for name in preemption.SIGNALS} == before


def test_watching_no_signals_leaves_them_alone():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.watch(()):
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_unknown_signal_name_is_an_error_naming_the_valid_ones():
  with pytest.raises(ValueError, match=r"save_on_signals takes names from \('SIGTERM', "
                                       r"'SIGINT', 'SIGUSR1'\).*\['SIGKILL'\]"):
    with preemption.watch(("SIGTERM", "SIGKILL")):
      pass
