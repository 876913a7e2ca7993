"""Run by tests/test_steps.py in a fresh process with 4 CPU devices.

Trains a small CIFAR ResNet for 3 steps on one global batch three ways (one
device, a 4-device mesh, pmap over 4 devices), then with ghost (per-device)
BatchNorm under jit and pmap, and prints the largest differences as JSON.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

if os.environ.get("CNNJAX_TEST_CACHE"):
  jax.config.update("jax_compilation_cache_dir", os.environ["CNNJAX_TEST_CACHE"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

import cnnjax  # noqa: E402
from cnnjax.train import optim, steps  # noqa: E402


def _quick(step):
  """The step compiled on first use at XLA optimisation level 0 (the runs are tiny)."""
  compiled = {}

  def call(state, batch):
    if "fn" not in compiled:
      compiled["fn"] = step.lower(state, batch).compile(
          compiler_options=steps.FAST_COMPILE_OPTIONS)
    return compiled["fn"](state, batch)
  return call


def main():
  assert jax.device_count() == 4, jax.devices()
  # ResNet-8 (one block per stage): every kind of layer, a fraction of the compile time.
  model = cnnjax.create_model("resnet20", num_classes=5, widths=(4, 8, 8), depth=8)
  shape = optim.schedule_shape("cosine", total_steps=3, steps_per_epoch=3)
  tx = optim.make_optimizer("sgd", shape, learning_rate=0.1, weight_decay=1e-3, momentum=0.9,
                            nesterov=True)
  config = steps.StepConfig(label_smoothing=0.1, ema_decay=0.9)
  rng = np.random.default_rng(0)
  batches = [{"image": jnp.asarray(rng.normal(size=(8, 16, 16, 3)), jnp.float32),
              "label": jnp.asarray(rng.integers(0, 5, size=8))} for _ in range(3)]
  init = lambda: steps.init_state(model, tx, (16, 16, 3), seed=0, ema=True)  # noqa: E731

  results = {}
  for name, devices in (("single", jax.devices()[:1]), ("mesh4", jax.devices())):
    mesh = steps.make_mesh(devices)
    train, _ = steps.jit_steps(model, tx, config, mesh)
    train = _quick(train)
    state = init()
    for batch in batches:
      state, _ = train(state, batch)
    results[name] = jax.device_get(state)

  train_p, _ = steps.pmap_steps(model, tx, config)
  train_p = _quick(train_p)
  state = init()
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (4,) + x.shape), state)
  for batch in batches:
    split = jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), batch)
    state, _ = train_p(state, split)
  results["pmap"] = jax.tree.map(lambda x: x[0], jax.device_get(state))

  def max_diff(a, b, field):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(getattr(a, field)), jax.tree.leaves(getattr(b, field))))

  # Ghost BatchNorm: per-device statistics, under jit (shard_map) and under pmap.
  ghost_config = steps.StepConfig(label_smoothing=0.1, ema_decay=0.9, ghost_batch_norm=True)
  train_g, _ = steps.jit_steps(model, tx, ghost_config, steps.make_mesh(jax.devices()))
  train_g = _quick(train_g)
  state = init()
  for batch in batches:
    state, _ = train_g(state, batch)
  results["ghost_jit"] = jax.device_get(state)
  train_gp, _ = steps.pmap_steps(model, tx, ghost_config)
  train_gp = _quick(train_gp)
  state = jax.tree.map(lambda x: jnp.broadcast_to(x, (4,) + x.shape), init())
  for batch in batches:
    state, _ = train_gp(state, jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), batch))
  results["ghost_pmap"] = jax.tree.map(lambda x: x[0], jax.device_get(state))

  report = {f"{other}_{field}": max_diff(results["single"], results[other], field)
            for other in ("mesh4", "pmap")
            for field in ("params", "batch_stats", "ema_params")}
  for field in ("params", "batch_stats"):
    report[f"ghost_pmap_vs_jit_{field}"] = max_diff(results["ghost_jit"], results["ghost_pmap"], field)
    report[f"ghost_vs_global_{field}"] = max_diff(results["ghost_jit"], results["single"], field)
  report["steps"] = int(results["mesh4"].step)
  report["moved"] = float(max(np.max(np.abs(np.asarray(x) - np.asarray(y))) for x, y in zip(
      jax.tree.leaves(results["single"].params), jax.tree.leaves(jax.device_get(init().params)))))
  json.dump(report, sys.stdout)


if __name__ == "__main__":
  main()
