"""Runs `train_and_evaluate` in a fresh process for the loop tests.

    python train_worker.py WORKDIR CONFIG_JSON [DEVICES [PROCESS_ID NUM_PROCESSES PORT]]

CONFIG_JSON holds overrides of `default_config()` as dotted keys. The worker
writes `params-<process>.npz` (the final params and batch_stats, flattened)
and `result-<process>.json` into WORKDIR.
"""

import json
import os
import sys

devices = int(sys.argv[3]) if len(sys.argv) > 3 else 1
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={devices}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

if os.environ.get("CNNJAX_TEST_CACHE"):
  jax.config.update("jax_compilation_cache_dir", os.environ["CNNJAX_TEST_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)



def _slow_storage(seconds: float, markers: str | None) -> None:
  """Every asynchronous checkpoint commit also waits for a write that takes `seconds`: storage
  slow enough for a test to suspend the process while a commit is in flight. With `markers`,
  a file there says when each commit's timed wait has begun."""
  import concurrent.futures  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  import threading  # noqa: PLC0415
  import time  # noqa: PLC0415

  from orbax.checkpoint._src.checkpointers import async_checkpointer  # noqa: PLC0415

  original = async_checkpointer._background_wait_for_commit_futures

  class SlowWrite(concurrent.futures.Future):
    """A write that starts when it is first waited for. Orbax waits for a commit's futures in
    order against one deadline, and this one is last. Its wait runs against an absolute
    deadline taken before its marker appears, in short slices: `Future.result(timeout)`
    would start its own clock only on entry, and a suspension that fell between the marker
    and that entry (seen once, in a loaded suite) restarted the clock and let the write
    finish in time. So a process suspended after the marker for longer than the timeout
    always times out on continuing: all of the write still lies ahead of it."""

    started = False

    def result(self, timeout=None):
      deadline = None if timeout is None else time.monotonic() + timeout
      if not self.started:
        self.started = True
        threading.Thread(target=self._write, daemon=True).start()
        if markers:
          pathlib.Path(markers, f"commit-{threading.get_ident()}-{id(self)}").touch()
      while deadline is not None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          raise concurrent.futures.TimeoutError()
        try:
          return super().result(min(remaining, 0.01))
        except concurrent.futures.TimeoutError:
          continue
      return super().result()

    def _write(self):
      # Many short sleeps, not one timer: after a suspension the rest of the write is
      # still ahead (a timer's deadline would pass during it too, and race the wait's).
      for _ in range(max(1, round(seconds / 0.01))):
        time.sleep(0.01)
      self.set_result(None)

  def slow(directory, commit_futures, *args, **kwargs):
    return original(directory, [*commit_futures, SlowWrite()], *args, **kwargs)

  async_checkpointer._background_wait_for_commit_futures = slow


if os.environ.get("CNNJAX_TEST_SLOW_COMMIT_SECONDS"):
  _slow_storage(float(os.environ["CNNJAX_TEST_SLOW_COMMIT_SECONDS"]),
                os.environ.get("CNNJAX_TEST_COMMIT_MARKERS"))

from cnnjax import train  # noqa: E402
from cnnjax.train import checkpoint as checkpoint_lib  # noqa: E402
from cnnjax.train.config import with_overrides  # noqa: E402


def main():
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  config = train.default_config()
  if len(sys.argv) > 4:
    process_id, num_processes, port = map(int, sys.argv[4:7])
    config.distributed.coordinator_address = f"127.0.0.1:{port}"
    config.distributed.num_processes = num_processes
    config.distributed.process_id = process_id
  config = with_overrides(config, overrides)
  result = train.train_and_evaluate(config, workdir)
  # The final state, read back from the newest checkpoint like any resumed run would.
  manager = checkpoint_lib.make_manager(os.path.join(workdir, "checkpoints"), async_save=False)
  step = manager.latest_step()
  restored = manager.restore(step)
  state = restored["state"]
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
          for field in ("params", "batch_stats")
          for path, leaf in jax.tree_util.tree_flatten_with_path({field: state[field]})[0]}
  index = jax.process_index()
  np.savez(os.path.join(workdir, f"params-{index}.npz"), **flat)
  with open(os.path.join(workdir, f"result-{index}.json"), "w") as handle:
    json.dump({**result, "checkpoint_step": int(step), "devices": jax.device_count(),
               "processes": jax.process_count()}, handle)


if __name__ == "__main__":
  main()
