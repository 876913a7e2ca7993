"""Sweeps on a local Ray cluster: the same table as in order, trials at once, retries that resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import sys
import threading
import time

import ml_collections
import pytest

from cnnjax.experiments import kinds, launch
from cnnjax.experiments.sweep import read_status, trial_dir, Trial

ray = pytest.importorskip("ray", reason="make test installs cnnjax[ray]")
pytestmark = pytest.mark.xdist_group("ray")  # one local cluster per test worker

# What depends on the machine's load, not on the computation.
TIMING = {"train_seconds", "images_per_second"}


@pytest.fixture(scope="module")
def cluster():
  """Two CPUs, started from an environment that forces two host devices, as a 2-device host.

  This process's own backend starts first, so its sequential reference runs keep one device
  (the variable is read once, when the backend starts).
  """
  import jax

  assert jax.device_count() == 1
  saved = os.environ.get("XLA_FLAGS")
  os.environ["XLA_FLAGS"] = f"{saved or ''} --xla_force_host_platform_device_count=2".strip()
  try:
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             log_to_driver=False)
    yield
  finally:
    ray.shutdown()
    if saved is None:
      os.environ.pop("XLA_FLAGS", None)
    else:
      os.environ["XLA_FLAGS"] = saved


def _sweep_config(data_dir, names=("a", "b"), steps=6) -> ml_collections.ConfigDict:
  from cnnjax import train

  t = train.default_config()
  t.data.dataset, t.data.data_dir, t.data.image_size = "digits", str(data_dir), 8
  t.data.mean, t.data.std, t.data.flip = (0.5,), (0.5,), False
  t.model_overrides.widths = (4, 4, 8)
  t.batch_size, t.num_steps, t.log_every_steps = 32, steps, 2
  # A checkpoint every few steps, an evaluation only at the end (evaluations cost time and
  # prove nothing here).
  t.eval_every_epochs, t.checkpoint_every_epochs = 1.0, 0.1
  t.progress_bar, t.fast_compile, t.optimizer.warmup_epochs = False, True, 0.0
  config = ml_collections.ConfigDict({
      "name": "raysweep", "kind": "sweep", "description": "test", "trial_resources": "CPU=1",
      "trials": [{"name": n, "overrides": {"seed": i}} for i, n in enumerate(names)]})
  config.train = t
  return config


def _table(workdir):
  with open(workdir / "results.csv") as handle:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(handle)]


def test_a_ray_sweep_equals_the_sequential_one_row_for_row_and_runs_trials_at_once(
    cluster, digits_data_dir, tmp_path):
  config = _sweep_config(digits_data_dir)
  kinds.run(config, tmp_path / "local", launcher=launch.Local())
  kinds.run(config, tmp_path / "ray", launcher=launch.make("ray", config.trial_resources))
  assert _table(tmp_path / "ray") == _table(tmp_path / "local")
  assert all(row["status"] == "done" for row in _table(tmp_path / "ray"))
  # On this 2-device host both trials ran at once, each in its own worker seeing one device.
  spans = []
  for index, name in enumerate(("a", "b")):
    status = read_status(trial_dir(tmp_path / "ray", index, Trial(name, {})))
    spans.append((status["started_unix"], status["started_unix"] + status["seconds"]))
    assert status["result"]["devices"] == 1
  assert max(s for s, _ in spans) < min(e for _, e in spans), spans


@pytest.fixture(scope="module")
def one_trial_reference(digits_data_dir, tmp_path_factory):
  """The 60-step sweep of one trial that the worker tests interrupt, run in order, uninterrupted:
  its config and the trial's result."""
  config = _sweep_config(digits_data_dir, names=("a",), steps=60)
  workdir = tmp_path_factory.mktemp("uninterrupted")
  kinds.run(config, workdir, launcher=launch.Local())
  return config, read_status(trial_dir(workdir, 0, Trial("a", {})))["result"]


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_or_preempted_worker_is_retried_and_its_trial_resumes_to_the_same_result(
    cluster, one_trial_reference, tmp_path, how):
  """SIGKILL: the retry resumes from the last periodic checkpoint. SIGTERM (a preempted
  node): the worker saves at its current step first, and the retry resumes from there."""
  config, reference = one_trial_reference
  directory = trial_dir(tmp_path / "ray", 0, Trial("a", {}))
  outcome = {}
  sweep = threading.Thread(target=lambda: outcome.update(kinds.run(
      config, tmp_path / "ray", launcher=launch.make("ray", "CPU=1"))))
  sweep.start()
  deadline = time.monotonic() + 240

  def finished_checkpoints():  # a finished save is renamed to its step; a save in flight is not
    return [p for p in (directory / "checkpoints").glob("*") if p.name.isdigit() and int(p.name)]

  while not finished_checkpoints() and time.monotonic() < deadline:
    time.sleep(0.1)
  victim = json.loads((directory / "lease.json").read_text())["pid"]
  assert victim != os.getpid()
  os.kill(victim, getattr(signal, how))
  sweep.join(timeout=300)
  status = read_status(directory)
  assert status["status"] == "done"
  for key in ("top1", "loss", "step"):
    assert status["result"][key] == reference[key], key
  # Two attempts, each compiled its step once: the second resumed from a checkpoint.
  metrics = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
  compiles = [m["step"] for m in metrics if m.get("split") == "compile"]
  assert len(compiles) == 2 and compiles[1] > 0, compiles
  assert [m["step"] for m in metrics if m.get("event") == "resume"] == compiles[1:]
  preempted = [m["step"] for m in metrics if m.get("event") == "preempted"]
  assert preempted == (compiles[1:] if how == "SIGTERM" else []), metrics


def test_resources_no_node_has_are_refused_with_the_clusters(cluster):
  with pytest.raises(launch.LaunchError, match=r"no node .*'GPU': 1\.0.*'CPU': 2\.0"):
    launch.make("ray", "GPU=1")
  with pytest.raises(launch.LaunchError, match="NAME=AMOUNT"):
    launch.make("ray", "GPU")


def test_an_address_that_does_not_answer_fails_quickly():
  start = time.monotonic()
  with pytest.raises(launch.LaunchError, match="no Ray cluster answers at 127.0.0.1:9"):
    launch.make("ray", "CPU=1", "127.0.0.1:9")
  assert time.monotonic() - start < 30


def test_without_ray_the_error_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "ray", None)
  with pytest.raises(launch.LaunchError, match=r"pip install 'cnnjax\[ray\]'"):
    launch.make("ray", "CPU=1")


def test_forced_host_devices_are_shared_out_by_cpus(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_foo=1")
  launcher = launch.RayLauncher.__new__(launch.RayLauncher)
  launcher.resources = {"CPU": 2.0}
  assert launcher._worker_env()["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=2 --xla_foo=1")


def test_a_fractional_gpu_gives_each_trials_jax_its_share_of_memory(monkeypatch):
  """GPU=0.25 puts four trials on one GPU; each JAX must not preallocate the default 75%."""
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  launcher = launch.RayLauncher.__new__(launch.RayLauncher)
  launcher.resources = launch.parse_resources("GPU=0.25,CPU=2")
  assert launcher._worker_env()["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"
  shares = [float(launch.gpu_memory_env(f)["XLA_PYTHON_CLIENT_MEM_FRACTION"])
            for f in (0.25, 0.5, 0.125)]
  assert 4 * shares[0] <= 0.9 and 2 * shares[1] <= 0.9 and 8 * shares[2] <= 0.9
  for whole in ("GPU=1", "GPU=2", "CPU=1"):  # a whole GPU keeps JAX's default
    launcher.resources = launch.parse_resources(whole)
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in launcher._worker_env()
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.1")  # the user's own value stands
  assert launch.gpu_memory_env(0.25) == {}


@pytest.mark.parametrize("text", ["GPU=1.5", "GPU=2.25,CPU=4"])
def test_a_gpu_amount_that_is_neither_a_share_nor_whole_gpus_is_refused(text):
  with pytest.raises(launch.LaunchError, match=r"neither a share of one GPU nor whole GPUs.*"
                                               r"GPU=0\.25.*GPU=2"):
    launch.parse_resources(text)


def test_a_preempted_driver_cancels_queued_trials_lets_the_running_one_save_and_resumes(
    cluster, digits_data_dir, tmp_path):
  """The driver's preemption signal (set here from a timer: a test's signal handlers belong to
  pytest) cancels the queued trial and interrupts the running one, which saves; the driver
  exits with the preemption code, and rerunning finishes both as an uninterrupted sweep."""
  from cnnjax.train import preemption

  # Two CPUs, one a trial (each seeing one device, as the local reference): "c" is queued.
  config = _sweep_config(digits_data_dir, names=("a", "b", "c"), steps=40)
  kinds.run(config, tmp_path / "uninterrupted", launcher=launch.Local())
  first = trial_dir(tmp_path / "ray", 0, Trial("a", {}))

  def preempt_once_a_checkpoint_exists():
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
      if any(p.name.isdigit() and int(p.name) for p in (first / "checkpoints").glob("*")):
        break
      time.sleep(0.1)
    preemption._received = "SIGTERM"  # what the driver's handler records

  timer = threading.Thread(target=preempt_once_a_checkpoint_exists)
  timer.start()
  try:
    with pytest.raises(preemption.Preempted) as stopped:
      kinds.run(config, tmp_path / "ray", launcher=launch.make("ray", config.trial_resources))
  finally:
    timer.join()
    preemption._received = None
  assert stopped.value.code == 75
  assert read_status(first)["status"] == "running"
  assert not (trial_dir(tmp_path / "ray", 2, Trial("c", {})) / "metrics.jsonl").exists()
  kinds.run(config, tmp_path / "ray", launcher=launch.make("ray", config.trial_resources))
  assert _table(tmp_path / "ray") == _table(tmp_path / "uninterrupted")
