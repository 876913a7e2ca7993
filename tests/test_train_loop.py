"""The training loop end to end: accuracy, exact resume, device counts, several processes."""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnnjax import train
from cnnjax.train import loop
from cnnjax.train.config import with_overrides
from cnnjax.train.logs import read_metrics

HERE = pathlib.Path(__file__).parent
WORKER = HERE / "train_worker.py"

# A tiny run on the embedded digits: 16x16 inputs keep the last stage's maps at 4x4.
TINY = {"data.image_size": 16, "data.train_crop": "pad_crop", "data.pad": 2, "data.mean": [0.5],
        "data.std": [0.5], "data.flip": False, "model_overrides.widths": [8, 8, 16],
        "model_overrides.depth": 8, "batch_size": 32,
        "optimizer.learning_rate": 0.02, "optimizer.schedule": "constant", "progress_bar": False,
        "fast_compile": True}


def _worker(workdir, overrides, devices=1, process=None, wait=True, cache=None, env=None):
  command = [sys.executable, str(WORKER), str(workdir), json.dumps(overrides), str(devices)]
  if process is not None:
    command += [str(p) for p in process]
  env = {**os.environ, "PYTHONPATH": str(HERE.parent), **(env or {})}
  if cache is not None:
    env["CNNJAX_TEST_CACHE"] = str(cache)
  proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if not wait:
    return proc
  output, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, output[-4000:]
  return output


def _params(workdir, process=0):
  with np.load(pathlib.Path(workdir) / f"params-{process}.npz") as npz:
    return {k: npz[k] for k in npz.files}


def _max_diff(a, b):
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _config(overrides):
  return with_overrides(train.default_config(), overrides)


def test_small_resnet_reaches_95_percent_on_digits_and_keeps_the_best(digits_data_dir, tmp_path):
  config = _config({**TINY, "data.data_dir": str(digits_data_dir), "optimizer.learning_rate": 0.1,
                    "optimizer.schedule": "cosine", "num_epochs": 10.0, "batch_size": 64,
                    "model_overrides.widths": [8, 16, 32], "model_overrides.depth": 20,
                    "best_metric": "top1", "eval_every_epochs": 2.0, "fast_compile": False})
  result = train.train_and_evaluate(config, tmp_path)
  assert result["count"] == 360  # the whole test split, counted once
  assert result["top1"] >= 0.95, result
  records = read_metrics(tmp_path / "metrics.jsonl")
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [44, 88, 132, 176, 220]
  assert any(r["split"] == "compile" and r["train_step_seconds"] > 0 for r in records)
  assert all(np.isfinite(r["loss"]) and r["images_per_second"] > 0
             for r in records if r["split"] == "train")
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  best_step = max(evals, key=lambda r: r["top1"])["step"]
  assert [p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()] == [str(best_step)]
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [176, 220]  # keep_checkpoints = 2
  # Started again, the finished run only evaluates what it holds.
  again = train.train_and_evaluate(config, tmp_path)
  assert again["step"] == 220 and again["top1"] == pytest.approx(result["top1"])


def test_a_fast_compile_traces_xla_convolutions_where_a_normal_one_lowers_them(
    digits_data_dir, tmp_path, monkeypatch):
  """fast_compile buys compile time in full: XLA's own convolution for every layer, where
  the CPU lowering turns the small maps' layers into matmuls (tuning is off here, so the
  choice is the static heuristic's: im2col at 16 output positions or fewer)."""
  from cnnjax.train import step_cache

  convolutions = {}
  load_or_compile = step_cache.load_or_compile

  def counting(jitted, args, **kwargs):
    if kwargs["description"]["step"] == "train":
      text = jitted.lower(*args).as_text()
      convolutions[kwargs["description"]["config"]["fast_compile"]] = text.count(
          "stablehlo.convolution")
    return load_or_compile(jitted, args, **kwargs)

  monkeypatch.setattr(step_cache, "load_or_compile", counting)
  for fast in (True, False):
    config = _config({**TINY, "data.data_dir": str(digits_data_dir), "num_steps": 1,
                      "eval_every_epochs": 100.0, "fast_compile": fast})
    train.train_and_evaluate(config, tmp_path / str(fast))
  assert convolutions[True] > convolutions[False] > 0, convolutions


@pytest.fixture(scope="module")
def reference_run(digits_data_dir, tmp_path_factory):
  """An uninterrupted 1-device run: 40 steps, a checkpoint every 4."""
  workdir = tmp_path_factory.mktemp("reference")
  overrides = {**TINY, "data.data_dir": str(digits_data_dir), "num_steps": 40,
               "eval_every_epochs": 4 / 44}
  _worker(workdir, overrides)
  return workdir, overrides


def _committed_steps(directory: pathlib.Path):
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_a_run_killed_with_sigkill_resumes_to_exactly_the_same_params(reference_run, tmp_path):
  reference, overrides = reference_run
  proc = _worker(tmp_path, overrides, wait=False)
  deadline = time.time() + 300
  while not _committed_steps(tmp_path / "checkpoints") and time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "result-0.json").exists()  # it really died in the middle
  killed_at = max(_committed_steps(tmp_path / "checkpoints"))
  assert killed_at < 40
  extra = tmp_path / "checkpoints" / str(killed_at) / "extra" / "metadata"
  seconds_before = json.loads(extra.read_text())["train_seconds"]
  started = time.perf_counter()
  _worker(tmp_path, overrides)
  resumed_wall = time.perf_counter() - started
  result = json.loads((tmp_path / "result-0.json").read_text())
  assert result["step"] == 40
  # The reported training time is the killed process's, up to its checkpoint, plus the
  # resumed process's own, which ran inside the worker's wall time.
  assert seconds_before > 0
  assert seconds_before < result["train_seconds"] < seconds_before + resumed_wall
  expected, resumed = _params(reference), _params(tmp_path)
  assert all(np.array_equal(expected[k], resumed[k]) for k in expected)
  assert any(r.get("event") == "resume" for r in map(json.loads, open(tmp_path / "metrics.jsonl")))


def test_checkpoints_between_evaluations_resume_to_the_same_params(reference_run, tmp_path):
  reference, overrides = reference_run
  # One evaluation at the end; checkpoints every 6 steps. Evaluation changes nothing that
  # training computes, so the params must equal the reference's, which evaluated every 4.
  sparse = {**overrides, "eval_every_epochs": 40 / 44, "checkpoint_every_epochs": 6 / 44}
  cache = tmp_path / "cache"  # cold, so the first part must compile
  _worker(tmp_path / "run", {**sparse, "stop_after_steps": 14}, cache=cache)
  assert _committed_steps(tmp_path / "run" / "checkpoints") == [12, 14]  # 14: where it stopped
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "14")  # resume from the one in between
  # Resumed with the splits decoded once and held in memory: the same batches, so the same
  # params (in_memory changes how the data is read, not what it is).
  _worker(tmp_path / "run", {**sparse, "data.in_memory": True}, cache=cache)
  assert _committed_steps(tmp_path / "run" / "checkpoints") == [36, 40]
  assert _max_diff(_params(reference), _params(tmp_path / "run")) == 0.0
  records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert {"event": "resume", "step": 12} in records
  assert [r["step"] for r in records if r.get("split") == "eval"] == [14, 40]
  # stop_after_steps changes when the run stops, not its step: the resumed part loads the
  # compiled step the first part wrote instead of tracing it again.
  compiles = [r for r in records if r.get("split") == "compile"]
  assert [r["from_step_cache"] for r in compiles] == [0.0, 1.0]


def test_another_seed_loads_the_compiled_step_and_trains_as_if_compiled_afresh(reference_run,
                                                                             tmp_path):
  """The seed picks the initial state and the data order, made outside the steps: the trials
  of a sweep over seeds share one compiled step, and what it trains does not change."""
  reference, overrides = reference_run
  other_seed = {**overrides, "seed": 1, "stop_after_steps": 8}
  _worker(tmp_path / "shared", other_seed)  # the reference run's cache holds its step
  _worker(tmp_path / "afresh", other_seed, cache=tmp_path / "cold")

  def compiles(workdir):
    return [r["from_step_cache"] for r in read_metrics(workdir / "metrics.jsonl")
            if r["split"] == "compile"]

  assert compiles(tmp_path / "shared") == [1.0] and compiles(tmp_path / "afresh") == [0.0]
  shared, afresh = _params(tmp_path / "shared"), _params(tmp_path / "afresh")
  assert _max_diff(shared, afresh) == 0.0
  assert _max_diff(shared, _params(reference)) > 0  # the seed did change the run


def test_a_corrupt_newest_checkpoint_resumes_from_the_one_before(reference_run, tmp_path):
  reference, overrides = reference_run
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for path in (workdir / "checkpoints" / "40").rglob("*"):
    if path.is_file() and "state" in path.parts:
      path.write_bytes(b"\x00not a checkpoint")
  output = _worker(workdir, overrides)
  assert "step 40" in output and "cannot be restored" in output
  assert any((workdir / "unreadable_checkpoints").iterdir())  # moved aside, not deleted
  # Resumed from step 36 and retrained the last 4 steps to the same params.
  assert _max_diff(_params(reference), _params(workdir)) == 0.0
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert {"event": "resume", "step": 36} in records
  # The reference run compiled this config's step: the resumed one loads it without tracing,
  # and the params above are bit-identical.
  compiles = [r for r in records if r.get("split") == "compile"]
  assert compiles and compiles[-1]["from_step_cache"] == 1.0


def test_a_checkpoint_restores_onto_a_different_device_count(reference_run, tmp_path):
  reference, overrides = reference_run
  # Step 36 of the 1-device reference run, continued for one step on 4 devices and on 1.
  for name in ("four", "one"):
    shutil.copytree(reference, tmp_path / name)
    shutil.rmtree(tmp_path / name / "checkpoints" / "40")  # this test's own copy
  _worker(tmp_path / "four", {**overrides, "stop_after_steps": 37}, devices=4)
  _worker(tmp_path / "one", {**overrides, "stop_after_steps": 37})
  four = json.loads((tmp_path / "four" / "result-0.json").read_text())
  assert four["devices"] == 4 and four["checkpoint_step"] == 37
  records = [json.loads(line) for line in open(tmp_path / "four" / "metrics.jsonl")]
  assert {"event": "resume", "step": 36} in records
  # Only the order of the cross-device reductions differs.
  assert _max_diff(_params(tmp_path / "one"), _params(tmp_path / "four")) < 1e-5


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_and_pmap_train_identically_to_one_device(digits_data_dir, tmp_path):
  overrides = {**TINY, "data.data_dir": str(digits_data_dir), "num_steps": 3}
  port = _free_port()
  procs = [_worker(tmp_path / "two", overrides, process=(i, 2, port), wait=False) for i in range(2)]
  for proc in procs:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-4000:]
  _worker(tmp_path / "one", overrides)
  first, second = _params(tmp_path / "two", 0), _params(tmp_path / "two", 1)
  assert all(np.array_equal(first[k], second[k]) for k in first)  # bit-identical replicas
  results = [json.loads((tmp_path / "two" / f"result-{i}.json").read_text()) for i in range(2)]
  assert [r["processes"] for r in results] == [2, 2] and results[0]["count"] == 360
  single = _params(tmp_path / "one")
  assert _max_diff(first, single) < 1e-5
  train_records = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")
                   if '"train"' in line]
  assert [r["step"] for r in train_records] == [3]  # process 1 wrote no logs
  # The pmap path of the loop, on two devices of one process, computes the same.
  _worker(tmp_path / "pmap", {**overrides, "parallelism": "pmap"}, devices=2)
  assert _max_diff(_params(tmp_path / "pmap"), single) < 1e-5


def test_a_non_finite_loss_stops_the_run_naming_the_step(digits_data_dir, tmp_path):
  # The learning rate grows 1e9-fold every 3 steps: training diverges a few steps in.
  config = _config({**TINY, "data.data_dir": str(digits_data_dir), "num_steps": 30,
                    "optimizer.schedule": "exponential", "optimizer.decay_rate": 1e9,
                    "optimizer.decay_epochs": 3 / 44, "eval_every_epochs": 2 / 44,
                    "log_every_steps": 1})
  with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+)") as error:
    train.train_and_evaluate(config, tmp_path)
  bad_step = int(re.search(r"at step (\d+)", str(error.value)).group(1))
  kept = _committed_steps(tmp_path / "checkpoints")
  assert 3 < bad_step < 30 and kept and max(kept) < bad_step


def test_the_finiteness_check_before_a_save_sees_any_bad_value_in_any_leaf():
  tree = {"conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)},
          "scale": jnp.float32(2.0), "head": jnp.arange(6.0).reshape(2, 3)}
  assert bool(loop._all_finite(tree))
  for leaf in range(len(jax.tree.leaves(tree))):
    for bad in (np.nan, np.inf, -np.inf):
      leaves, treedef = jax.tree.flatten(tree)
      poisoned = np.array(leaves[leaf])
      poisoned.reshape(-1)[-1] = bad
      leaves[leaf] = jnp.asarray(poisoned)
      assert not bool(loop._all_finite(jax.tree.unflatten(treedef, leaves))), (leaf, bad)


def test_resuming_with_a_different_config_is_refused(tmp_path):
  config = train.default_config()
  loop._check_or_write_config(config, tmp_path)
  changed = train.default_config()
  changed.model = "resnet32"
  with pytest.raises(loop.ConfigMismatchError, match="model: 'resnet20' -> 'resnet32'"):
    loop._check_or_write_config(changed, tmp_path)
  harmless = train.default_config()
  harmless.progress_bar = False
  harmless.data.num_workers = 2
  harmless.data.in_memory = True
  loop._check_or_write_config(harmless, tmp_path)  # how a run is run may change
  assert json.loads((tmp_path / "config.json").read_text())["model"] == "resnet20"


def test_a_run_from_weights_may_find_them_under_another_path(tmp_path):
  weights, moved = tmp_path / "pretrained.safetensors", tmp_path / "moved" / "pretrained.safetensors"
  weights.write_bytes(b"the weights a run started from")
  config = train.default_config()
  config.init_from = str(weights)
  run = tmp_path / "run"
  loop._check_or_write_config(config, run)
  saved = json.loads((run / "config.json").read_text())
  assert saved[loop.INIT_DIGEST] == hashlib.sha256(weights.read_bytes()).hexdigest()
  moved.parent.mkdir()
  moved.write_bytes(weights.read_bytes())
  relocated = train.default_config()
  relocated.init_from = str(moved)
  assert loop.check_saved_config(relocated, run)  # the same weights elsewhere: the same run
  moved.write_bytes(b"other weights")
  with pytest.raises(loop.ConfigMismatchError, match="init_from: .*moved"):
    loop.check_saved_config(relocated, run)
  other = train.default_config()
  other.init_from = str(tmp_path / "absent.safetensors")
  with pytest.raises(loop.ConfigMismatchError, match="init_from: .*absent"):
    loop.check_saved_config(other, run)
  # A config.json written before digests were recorded: the path alone decides.
  (run / "config.json").write_text(json.dumps({k: v for k, v in saved.items()
                                               if k != loop.INIT_DIGEST}))
  assert loop.check_saved_config(config, run)
  with pytest.raises(loop.ConfigMismatchError, match="init_from"):
    loop.check_saved_config(relocated, run)


def test_config_typos_name_the_key():
  config = train.default_config()
  with pytest.raises(AttributeError, match="lerning_rate"):
    config.optimizer.lerning_rate = 0.1
  config.dtype = "float8"
  with pytest.raises(ValueError, match="config.dtype must be one of"):
    train.train_and_evaluate(config, "/nonexistent/never/created")
  config.dtype = "float32"
  config.checkpoint_every_epochs = 0.0
  with pytest.raises(ValueError, match="config.checkpoint_every_epochs must be positive"):
    train.train_and_evaluate(config, "/nonexistent/never/created")
  config.checkpoint_every_epochs = None
  config.checkpoint_timeout_seconds = 0
  with pytest.raises(ValueError, match=r"checkpoint_timeout_seconds must be a positive number "
                                       r"of seconds \(or None for Orbax's 1,200\), got 0"):
    train.train_and_evaluate(config, "/nonexistent/never/created")
  config.checkpoint_timeout_seconds = None
  config.save_on_signals = ("SIGTERM", "SIGHUP")
  with pytest.raises(ValueError, match=r"save_on_signals takes names from .*\['SIGHUP'\]"):
    train.train_and_evaluate(config, "/nonexistent/never/created")
  assert not pathlib.Path("/nonexistent/never/created").exists()


# Preemption (cnnjax.train.preemption): a signal saves at the current step, the rerun resumes.

def _wait_for_checkpoint(proc, directory, timeout=300):
  deadline = time.time() + timeout
  while not _committed_steps(directory) and time.time() < deadline:
    assert proc.poll() is None, proc.stdout.read()[-4000:]
    time.sleep(0.01)


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGUSR1", "SIGINT")],
                         ids=["sigterm", "second-signal-while-saving"])
def test_a_preempted_run_saves_exits_75_and_its_rerun_equals_the_uninterrupted_one(
    reference_run, tmp_path, signals):
  """One signal: the run saves after its step and exits 75 within the grace period. A second
  signal right behind it may end the process at once: every checkpoint left is still readable
  and the rerun still ends exactly as the uninterrupted run."""
  reference, overrides = reference_run
  proc = _worker(tmp_path, overrides, wait=False)
  _wait_for_checkpoint(proc, tmp_path / "checkpoints")
  before = max(_committed_steps(tmp_path / "checkpoints"))
  sent = time.time()
  for name in signals:
    proc.send_signal(getattr(signal, name))
  output, _ = proc.communicate(timeout=60)
  assert time.time() - sent < 30, "not within a preemption grace period"
  assert proc.returncode == 75, output[-4000:]
  assert not (tmp_path / "result-0.json").exists()
  saved = max(_committed_steps(tmp_path / "checkpoints"))
  if len(signals) == 1:
    stopped = re.search(r"preempted at step (\d+); rerun the same command to resume", output)
    assert stopped, output[-4000:]
    assert int(stopped.group(1)) == saved and before <= saved < 40
  from cnnjax.train import checkpoint as checkpoint_lib
  for step in _committed_steps(tmp_path / "checkpoints"):  # nothing half-written
    manager = checkpoint_lib.make_manager(tmp_path / "checkpoints", async_save=False)
    assert manager.restore(step)["extra"]["step"] == step
  if len(signals) > 1:
    return  # the rerun from a readable checkpoint is the one-signal case's
  _worker(tmp_path, overrides)
  assert json.loads((tmp_path / "result-0.json").read_text())["step"] == 40
  expected, resumed = _params(reference), _params(tmp_path)
  assert all(np.array_equal(expected[k], resumed[k]) for k in expected)


def test_two_processes_agree_on_the_step_to_save_when_one_is_signalled(digits_data_dir, tmp_path):
  overrides = {**TINY, "data.data_dir": str(digits_data_dir), "num_steps": 400,
               "eval_every_epochs": 4 / 44}
  port = _free_port()
  procs = [_worker(tmp_path, overrides, process=(i, 2, port), wait=False) for i in range(2)]
  _wait_for_checkpoint(procs[0], tmp_path / "checkpoints")
  procs[1].send_signal(signal.SIGUSR1)  # Slurm's --signal; only one process hears it
  outputs = [proc.communicate(timeout=120)[0] for proc in procs]
  assert [proc.returncode for proc in procs] == [75, 75], outputs[0][-3000:] + outputs[1][-3000:]
  steps = [int(re.search(r"preempted at step (\d+)", out).group(1)) for out in outputs]
  assert steps[0] == steps[1] < 400
  assert max(_committed_steps(tmp_path / "checkpoints")) == steps[0]


def test_a_commit_that_outlives_its_timeout_in_a_suspended_process_fails_nothing(
    reference_run, tmp_path):
  """SIGSTOP while a checkpoint commits, for twice Orbax's (shortened) commit timeout: the
  commit times out once the process continues; the run writes the state again and ends
  exactly as the uninterrupted one."""
  reference, overrides = reference_run
  timeout, commit = 1, 0.6
  markers = tmp_path / "commits"
  markers.mkdir()
  proc = _worker(tmp_path / "run", {**overrides, "checkpoint_timeout_seconds": timeout},
                 env={"CNNJAX_TEST_SLOW_COMMIT_SECONDS": str(commit),
                      "CNNJAX_TEST_COMMIT_MARKERS": str(markers)}, wait=False)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if any(markers.iterdir()):  # a commit's timed wait has begun: suspend inside it
      proc.send_signal(signal.SIGSTOP)
      time.sleep(2 * timeout)
      proc.send_signal(signal.SIGCONT)
      break
    time.sleep(0.002)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-4000:]
  assert "did not commit within Orbax's timeout" in output, output[-4000:]
  assert json.loads((tmp_path / "run" / "result-0.json").read_text())["step"] == 40
  expected, resumed = _params(reference), _params(tmp_path / "run")
  assert all(np.array_equal(expected[k], resumed[k]) for k in expected)


@pytest.fixture
def small_filesystem(tmp_path):
  """A 32 MiB tmpfs of its own, so that filling it fills no one else's disk (needs root)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a small filesystem here ({mounted.stderr.strip()}); "
                "test_checkpoint's injected ENOSPC covers the translation")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_rerun_resumes(reference_run,
                                                                          small_filesystem):
  reference, overrides = reference_run
  overrides = {**overrides, "tensorboard": False}
  workdir = small_filesystem / "run"
  proc = _worker(workdir, overrides, wait=False)
  _wait_for_checkpoint(proc, workdir / "checkpoints")
  filler = small_filesystem / "filler"
  with open(filler, "wb") as handle:  # everything but 16 KiB: room for log lines, not a state
    os.posix_fallocate(handle.fileno(), 0, shutil.disk_usage(small_filesystem).free - 2**14)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode not in (0, 75), output[-4000:]
  failed = re.search(r"DiskFullError: \[Errno 28\] no space left in (\S+) for the checkpoint of "
                     r"step (\d+): it needs up to [\d.,]+ MiB \(([\d,]+) bytes, the train state\), "
                     r"[\d.,]+ MiB are free; the checkpoint of step (\d+) is kept and readable",
                     output)
  assert failed, output[-4000:]
  assert failed.group(1) == str(workdir / "checkpoints")
  assert int(failed.group(3).replace(",", "")) > 10_000
  kept = int(failed.group(4))
  assert kept < int(failed.group(2)) and max(_committed_steps(workdir / "checkpoints")) == kept
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  filler.unlink()  # space freed: the same command resumes from the kept checkpoint
  output = _worker(workdir, overrides)
  assert json.loads((workdir / "result-0.json").read_text())["step"] == 40
  expected, resumed = _params(reference), _params(workdir)
  assert all(np.array_equal(expected[k], resumed[k]) for k in expected)
