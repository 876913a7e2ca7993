"""One owner per workdir: an exclusive lease with the holder's host, pid and a heartbeat.

Two processes writing one workdir append each other's metrics and delete each
other's checkpoints, and both exit 0. So a training run, a sweep and a single
trial hold a lease on their directory while they write: `<workdir>/lease.json`,
created exclusively (`O_EXCL`), naming the host, pid and start time, with a
heartbeat a daemon thread rewrites every `HEARTBEAT_SECONDS`.

A second process that finds a live lease fails at once with `WorkdirBusyError`
naming the holder, before it writes anything. A lease whose holder is dead —
its pid is gone on this host, or its heartbeat is older than `STALE_SECONDS`
(a holder on another host, or a frozen one) — is taken over: the old file is
renamed aside atomically (so of two contenders exactly one wins), a warning
logs the takeover and the new lease records whom it replaced. A holder whose
lease was taken over finds out at its next heartbeat (`check` then raises
`WorkdirLeaseLost`) and must stop writing.

Within one process leases are re-entrant: a sweep's trial and the training run
inside it may both hold the trial's directory.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import pathlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from cnnjax import fileio

log = logging.getLogger("cnnjax.lease")

FILENAME = "lease.json"
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 30.0


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir."""


class WorkdirLeaseLost(RuntimeError):
  """This process's lease was taken over (it was thought dead); it must stop writing."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    return True
  return True


def holder_is_dead(record: dict, now: float | None = None) -> str | None:
  """Why the lease `record` is dead, or None while its holder may be alive."""
  now = time.time() if now is None else now
  if record.get("host") == socket.gethostname() and not _pid_alive(int(record.get("pid", -1))):
    return f"pid {record.get('pid')} is gone on this host"
  age = now - float(record.get("heartbeat", 0))
  if age > STALE_SECONDS:
    return f"its heartbeat is {age:.0f} s old (stale after {STALE_SECONDS:.0f} s)"
  return None


def describe(record: dict) -> str:
  """A lease record (`lease.json`'s contents) as people read it: pid, host, since, heartbeat."""
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
  return (f"pid {record.get('pid')} on {record.get('host')} (since {started}, heartbeat "
          f"{time.time() - float(record.get('heartbeat', 0)):.0f} s ago)")


@dataclasses.dataclass
class Lease:
  """A held lease on a workdir: its `lease.json` `path`, this holder's `token` and `record`
  (host, pid, start, heartbeat), how many `holds` this process has on it, and whether it
  was `lost` to a takeover. `acquire` makes one; `release` gives it up; `check` raises
  `WorkdirLeaseLost` once another process took it over."""

  path: pathlib.Path
  token: str
  record: dict
  holds: int = 1
  lost: bool = False
  _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
  _thread: threading.Thread | None = None

  def check(self) -> None:
    """Raises `WorkdirLeaseLost` once another process has taken this lease over."""
    if self.lost:
      raise WorkdirLeaseLost(
          f"the lease on {self.path.parent} was taken over by another process (this one was "
          f"thought dead: no heartbeat for {STALE_SECONDS:.0f} s); stopping without writing more")

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        current = json.loads(self.path.read_text())
      except (OSError, ValueError):
        current = {}
      if current.get("token") != self.token:
        self.lost = True
        log.error("lease on %s lost: now held by %s", self.path.parent, describe(current))
        return
      self.record["heartbeat"] = time.time()
      try:
        fileio.write_atomically(self.path, json.dumps(self.record))
      except OSError as error:
        log.warning("lease heartbeat on %s failed: %s", self.path, error)

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=HEARTBEAT_SECONDS + 1)
    try:
      if json.loads(self.path.read_text()).get("token") == self.token:
        self.path.unlink()
    except (OSError, ValueError):
      pass


_held: dict[pathlib.Path, Lease] = {}
_default_wait = contextvars.ContextVar("cnnjax_lease_wait", default=0.0)


@contextlib.contextmanager
def waiting(seconds: float) -> Iterator[None]:
  """Within the block, acquisitions wait up to `seconds` for a live holder (retried tasks)."""
  token = _default_wait.set(seconds)
  try:
    yield
  finally:
    _default_wait.reset(token)
_held_lock = threading.Lock()


def _try_create(path: pathlib.Path, record: dict) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as handle:
    handle.write(json.dumps(record))
  return True


def acquire(workdir: str | os.PathLike, wait_seconds: float | None = None) -> Lease:
  """The lease on `workdir` (created if needed), or `WorkdirBusyError`.

  With `wait_seconds`, a live holder is waited for that long (a retried task
  whose previous attempt died on another host waits for its heartbeat to go stale).
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  path = workdir / FILENAME
  with _held_lock:
    if path in _held:
      _held[path].holds += 1
      return _held[path]
  workdir.mkdir(parents=True, exist_ok=True)
  token = uuid.uuid4().hex
  wait_seconds = _default_wait.get() if wait_seconds is None else wait_seconds
  deadline = time.monotonic() + wait_seconds
  while True:
    now = time.time()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
              "started": now, "heartbeat": now}
    if _try_create(path, record):
      break
    try:
      current = json.loads(path.read_text())
    except FileNotFoundError:
      continue  # released meanwhile
    except (OSError, ValueError):
      current = {}  # unreadable (a crash mid-write is impossible: heartbeats rename whole)
    dead = holder_is_dead(current) if current else "the lease file is unreadable"
    if dead:
      aside = path.with_name(f"{FILENAME}.taken-over-{token}")
      try:
        os.rename(path, aside)  # atomic: of two contenders, one renames, the other retries
      except FileNotFoundError:
        continue
      created = _try_create(path, {**record, "took_over": current})
      aside.unlink(missing_ok=True)
      if not created:  # another process created a fresh lease in between: it is live
        continue
      log.warning("took over the lease on %s from %s: %s", workdir,
                  describe(current) if current else "an unreadable lease", dead)
      record["took_over"] = current
      break
    if time.monotonic() >= deadline:
      raise WorkdirBusyError(
          f"{workdir} is in use by {describe(current)}. Wait for it to finish, or use another "
          f"workdir; if that process is gone, its lease is taken over automatically once its "
          f"heartbeat is {STALE_SECONDS:.0f} s old (or at once on its own host).")
    time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))
  lease = Lease(path, token, record)
  lease._thread = threading.Thread(target=lease._beat, name=f"lease {workdir}", daemon=True)
  lease._thread.start()
  with _held_lock:
    _held[path] = lease
  return lease


def release(lease: Lease) -> None:
  """Gives up one hold of `lease`; the last one stops its heartbeat and removes
  `lease.json` if it is still this process's."""
  with _held_lock:
    lease.holds -= 1
    if lease.holds > 0:
      return
    _held.pop(lease.path, None)
  lease.release()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, wait_seconds: float | None = None) -> Iterator[Lease]:
  """The lease on `workdir` for the block (see `acquire`)."""
  lease = acquire(workdir, wait_seconds)
  try:
    yield lease
  finally:
    release(lease)
