"""Who runs a sweep's trials: this process one after another, or a Ray cluster at once.

`Local` runs them in order, in this process. `RayLauncher` submits every
unfinished trial as a Ray task with the resources of `config.trial_resources`
(`{"CPU": 2}`, `{"GPU": 1}`, ...), so a host with 8 GPUs runs 8 trials at
once, each seeing only its own GPU (Ray sets `CUDA_VISIBLE_DEVICES`), and a
multi-host cluster spreads them. On a CPU machine whose host devices are
forced (`--xla_force_host_platform_device_count`), each trial sees as many
devices as the CPUs it holds.

The trial directories on shared storage stay the contract: a task runs
`sweep.run_trial`, which writes the trial's status, checkpoints and metrics
under its lease (`cnnjax.lease`). A task whose worker died is retried by Ray
(`MAX_RETRIES`) and resumes from its own checkpoints, taking over the dead
attempt's lease; so is one whose worker was preempted (SIGTERM: it saved at
its current step first, `cnnjax.train.preemption`). A driver that is itself
sent a preemption signal cancels the trials still queued, asks the running
ones to save (Ray interrupts them), waits for them up to `GRACE_SECONDS` and
exits with the preemption exit code; rerun it to resume.

A fractional GPU (`GPU=0.25`: four trials share one GPU) gives each trial's
JAX that share of the GPU's memory, less 10% for the CUDA context and
fragmentation (`XLA_PYTHON_CLIENT_MEM_FRACTION`, unless set already): by
default each JAX process preallocates 75%, so a second trial on the same
GPU would run out of memory. A trial that fails is recorded as in a local sweep and the
others go on. The driver blocks until every submitted trial has ended,
printing a progress line, so an experiment's stages (EfficientNet's step 2
after step 1's winner) stay ordinary Python: each stage is one `run_sweep`.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping, Sequence

from cnnjax import host_allocator, lease, xla_cpu

INSTALL = "pip install 'cnnjax[ray]'"
MAX_RETRIES = 3
GRACE_SECONDS = 25.0
# A trial's share of a fractional GPU's memory: its fraction less this headroom.
GPU_MEMORY_HEADROOM = 0.9
CONNECT_TIMEOUT_SECONDS = 30.0


class LaunchError(ValueError):
  """The launcher cannot run here: no Ray, no cluster, or resources no node has."""


class Local:
  """Trials one after another in this process; after a preemption signal, no new one starts."""

  name = "local"

  def run(self, jobs: Sequence, run_one) -> list[dict]:
    from cnnjax.train import preemption  # noqa: PLC0415

    records = []
    for index, trial in jobs:
      if preemption.requested():  # the running trial saved and stopped already, or none ran
        raise preemption.stop(None)
      print(f"[trial {index}] {trial.name}", flush=True)
      records.append(run_one(index, trial))
    return records


def _ray():
  try:
    import ray  # noqa: PLC0415
  except ImportError as error:
    raise LaunchError(f"--launcher=ray needs Ray, which is not installed: {INSTALL}") from error
  return ray


def _check_reachable(address: str) -> None:
  """A host:port that does not answer fails here, in seconds, instead of hanging Ray."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise LaunchError(f"--ray_address must be 'auto' or host:port, got {address!r}")
  try:
    with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_SECONDS / 3):
      pass
  except OSError as error:
    raise LaunchError(f"no Ray cluster answers at {address} ({error}); start one with "
                      f"`ray start --head` there, or check the address") from error


def _task_options(resources: Mapping[str, float]) -> dict:
  resources = {k: float(v) for k, v in resources.items()}
  options = {"num_cpus": resources.pop("CPU", 1.0), "num_gpus": resources.pop("GPU", 0.0)}
  if resources:
    options["resources"] = resources
  return options


def fits(resources: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> bool:
  """Whether some node offers every resource a trial asks for."""
  return any(all(node.get(k, 0.0) >= float(v) for k, v in resources.items()) for node in nodes)


class RayLauncher:
  """Trials as Ray tasks on the cluster at `address` ("auto", "host:port" or None: a local one)."""

  name = "ray"

  def __init__(self, resources: Mapping[str, float], address: str | None = None):
    self.resources = dict(resources)
    if not self.resources or any(float(v) < 0 for v in self.resources.values()):
      raise LaunchError(f"config.trial_resources must be a non-empty mapping of Ray resources "
                        f"to amounts >= 0, e.g. {{'CPU': 1}} or {{'GPU': 1}}; got {resources}")
    ray = _ray()
    if address not in (None, "auto"):
      _check_reachable(address)
    try:
      if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as error:
      raise LaunchError(f"could not connect to Ray at {address!r}: {error}") from error
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not fits(self.resources, nodes):
      raise LaunchError(f"no node of the Ray cluster has the resources a trial asks for "
                        f"(config.trial_resources = {self.resources}); the cluster's nodes "
                        f"have {[{k: v for k, v in n.items() if not k.startswith('node:')} for n in nodes]}")

  def _worker_env(self) -> dict:
    # Workers start from the raylet, not from this process: the driver's choices about the
    # allocator (an opt-out, MALLOC_* values of its own) go with them; `import cnnjax` in the
    # worker does the rest.
    env = {"PYTHONUNBUFFERED": "1", **host_allocator.users_own(os.environ),
           **{k: v for k, v in os.environ.items() if k == host_allocator.ENV_OPT_OUT}}
    env.update(gpu_memory_env(self.resources.get("GPU", 0.0)))
    flags = os.environ.get("XLA_FLAGS", "")
    if xla_cpu.FORCED_DEVICES.search(flags):  # a trial sees the host devices its CPUs pay for
      devices = max(1, int(float(self.resources.get("CPU", 1))))
      env["XLA_FLAGS"] = xla_cpu.FORCED_DEVICES.sub(
          f"--xla_force_host_platform_device_count={devices}", flags)
    return env

  def run(self, jobs: Sequence, run_one) -> list[dict]:
    ray = _ray()
    from cnnjax.train import preemption  # noqa: PLC0415

    # A fresh worker per trial (max_calls=1): JAX starts clean and sees only its devices. A
    # preempted trial saved before it stopped: retried, it resumes from there.
    remote = ray.remote(max_calls=1, max_retries=MAX_RETRIES,
                        retry_exceptions=[TrialPreempted])(_run_in_worker)
    options = {**_task_options(self.resources),
               "runtime_env": {"env_vars": self._worker_env()}}
    # Workers share the driver's persistent compilation cache, if it has one.
    import jax  # noqa: PLC0415

    cache_dir = jax.config.jax_compilation_cache_dir
    pending = {}
    for index, trial in jobs:
      pending[remote.options(**options, name=f"trial {index} {trial.name}").remote(
          run_one, index, trial, cache_dir)] = (index, trial)
    records: dict[int, dict] = {}
    started = time.perf_counter()
    cancelled_at = None
    while pending:
      if preemption.requested() and cancelled_at is None:
        print(f"{preemption.requested()}: cancelling the queued trials, letting the running ones "
              "save", flush=True)
        for ref in pending:
          ray.cancel(ref, force=False)
        cancelled_at = time.perf_counter()
      if cancelled_at is not None and time.perf_counter() - cancelled_at > GRACE_SECONDS:
        break
      ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
      for ref in ready:
        index, trial = pending.pop(ref)
        try:
          records[index] = ray.get(ref)
        except Exception as error:  # noqa: BLE001 - a worker lost for good: the sweep goes on
          # Cancelled by a preemption: not a failure, and resumed by the next run.
          status = "cancelled" if cancelled_at is not None else "failed"
          records[index] = {"index": index, "name": trial.name, "info": trial.info,
                            "overrides": trial.overrides, "status": status,
                            "error": f"{type(error).__name__}: {error}"[:2000]}
      if ready:
        failed = sum(r.get("status") == "failed" for r in records.values())
        print(f"trials: {len(records) - failed} done, {len(pending)} running or queued, "
              f"{failed} failed ({time.perf_counter() - started:.0f} s)", flush=True)
    if cancelled_at is not None:
      raise preemption.stop(None)
    return [records[index] for index, _ in jobs]


class TrialPreempted(RuntimeError):
  """A trial's worker was sent a preemption signal and saved: Ray retries it (it resumes)."""


def _run_in_worker(run_one, index, trial, cache_dir):
  from cnnjax.train import preemption  # noqa: PLC0415

  try:
    return _run_with_cache(run_one, index, trial, cache_dir)
  except preemption.Preempted as stopped:
    raise TrialPreempted(f"trial {index} ({trial.name}): {stopped}") from None


def _run_with_cache(run_one, index, trial, cache_dir):
  if cache_dir:
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", cache_dir)
  # A retried attempt may find the dead attempt's lease; on another host its heartbeat
  # must go stale first, so wait that long rather than failing the retry.
  with lease.waiting(lease.STALE_SECONDS + 2 * lease.HEARTBEAT_SECONDS):
    return run_one(index, trial)


def make(name: str, resources: str = "CPU=1", address: str | None = None):
  """The launcher `--launcher` names, connected and checked before any trial is submitted."""
  if name == "local":
    return Local()
  if name == "ray":
    return RayLauncher(parse_resources(resources), address)
  raise LaunchError(f"unknown launcher {name!r}; choose 'local' or 'ray'")


def gpu_memory_env(gpus: float) -> dict[str, str]:
  """The environment that fits a trial's JAX into its share of a GPU: empty for whole GPUs."""
  if not 0 < gpus < 1 or "XLA_PYTHON_CLIENT_MEM_FRACTION" in os.environ:
    return {}
  share = math.floor(1000 * gpus * GPU_MEMORY_HEADROOM) / 1000  # rounded down: trials fit
  return {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{share:.3f}"}


def parse_resources(text: str) -> dict[str, float]:
  """"CPU=2" or "GPU=1,CPU=4" (config.trial_resources) as a mapping of Ray resources."""
  resources = {}
  for part in filter(None, (p.strip() for p in str(text).split(","))):
    name, _, amount = part.partition("=")
    try:
      resources[name.strip()] = float(amount)
    except ValueError:
      raise LaunchError(f"config.trial_resources must look like 'CPU=1' or 'GPU=1,CPU=4'; "
                        f"{part!r} in {text!r} is not NAME=AMOUNT") from None
    if not name.strip() or resources[name.strip()] < 0:
      raise LaunchError(f"config.trial_resources: {part!r} needs a name and an amount >= 0")
    gpus = resources.get("GPU")
    if name.strip() == "GPU" and gpus > 1 and gpus != int(gpus):
      raise LaunchError(f"config.trial_resources: GPU={amount} is neither a share of one GPU nor "
                        "whole GPUs; use a fraction in (0, 1] (GPU=0.25: four trials per GPU) or a "
                        "whole number (GPU=2)")
  if not resources:
    raise LaunchError(f"config.trial_resources is empty ({text!r}); e.g. 'CPU=1' or 'GPU=1'")
  return resources
