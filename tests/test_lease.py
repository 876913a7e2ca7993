"""One owner per workdir: a live holder refuses others; a dead one is taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from cnnjax import lease
from tests.conftest import REPO

_HOLDER = """
import sys, time
from cnnjax import lease
held = lease.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
  """A live process holding `tmp_path/run`'s lease."""
  workdir = tmp_path / "run"
  process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "CNNJAX_XLA_FLAGS": "0"})
  assert process.stdout.readline().strip() == "held"
  yield workdir, process
  process.kill()
  process.wait()


def test_a_live_holder_refuses_a_second_run_which_writes_nothing(holder, digits_data_dir):
  from cnnjax import train

  workdir, process = holder
  before = sorted(p.name for p in workdir.iterdir())
  config = train.default_config()
  config.data.dataset, config.data.data_dir, config.num_steps = "digits", str(digits_data_dir), 2
  with pytest.raises(lease.WorkdirBusyError, match=rf"in use by pid {process.pid} on "):
    train.train_and_evaluate(config, workdir)
  assert sorted(p.name for p in workdir.iterdir()) == before == ["lease.json"]
  assert json.loads((workdir / "lease.json").read_text())["pid"] == process.pid


def test_the_command_line_refuses_with_one_error_line(holder):
  workdir, process = holder
  out = subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
                        "--config=experiments/configs/quickstart.py:smoke"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert f"error: WorkdirBusyError: {workdir} is in use by pid {process.pid}" in out.stderr
  assert "Traceback" not in out.stderr


def test_a_sigkilled_holders_lease_is_taken_over_and_logged(holder, caplog):
  workdir, process = holder
  process.send_signal(signal.SIGKILL)
  process.wait()
  with caplog.at_level(logging.WARNING, logger="cnnjax.lease"):
    with lease.hold(workdir) as held:
      assert held.record["took_over"]["pid"] == process.pid
      assert json.loads((workdir / "lease.json").read_text())["pid"] == os.getpid()
  assert f"took over the lease on {workdir} from pid {process.pid}" in caplog.text
  assert "is gone on this host" in caplog.text
  assert not (workdir / "lease.json").exists()   # released


def _foreign(workdir, heartbeat_age):
  workdir.mkdir(parents=True, exist_ok=True)
  now = time.time()
  (workdir / "lease.json").write_text(json.dumps({
      "host": "another-host", "pid": 1, "token": "theirs", "started": now - 100,
      "heartbeat": now - heartbeat_age}))


def test_a_holder_on_another_host_is_judged_by_its_heartbeat(tmp_path):
  _foreign(tmp_path / "a", heartbeat_age=2)
  with pytest.raises(lease.WorkdirBusyError, match="pid 1 on another-host"):
    lease.acquire(tmp_path / "a")
  _foreign(tmp_path / "b", heartbeat_age=lease.STALE_SECONDS + 5)
  with lease.hold(tmp_path / "b") as held:
    assert held.record["took_over"]["host"] == "another-host"


def test_waiting_outlasts_a_holder_whose_heartbeat_goes_stale(tmp_path, monkeypatch):
  monkeypatch.setattr(lease, "STALE_SECONDS", 1.0)
  _foreign(tmp_path, heartbeat_age=0)
  start = time.monotonic()
  with lease.waiting(5.0), lease.hold(tmp_path):
    assert 0.9 < time.monotonic() - start < 5


def test_leases_are_reentrant_in_a_process_and_released_by_the_last_holder(tmp_path):
  with lease.hold(tmp_path) as outer:
    with lease.hold(tmp_path) as inner:
      assert inner is outer
    assert (tmp_path / "lease.json").exists()
  assert not (tmp_path / "lease.json").exists()


def test_a_holder_taken_over_learns_it_and_stops(tmp_path, monkeypatch):
  monkeypatch.setattr(lease, "HEARTBEAT_SECONDS", 0.1)
  with lease.hold(tmp_path) as held:
    held.check()
    record = json.loads((tmp_path / "lease.json").read_text())
    (tmp_path / "lease.json").write_text(json.dumps({**record, "token": "someone else",
                                                     "host": socket.gethostname()}))
    deadline = time.monotonic() + 5
    while not held.lost and time.monotonic() < deadline:
      time.sleep(0.05)
    with pytest.raises(lease.WorkdirLeaseLost, match="taken over by another process"):
      held.check()
  assert json.loads((tmp_path / "lease.json").read_text())["token"] == "someone else"  # kept
