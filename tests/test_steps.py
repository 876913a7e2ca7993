"""The compiled steps: device-count invariance, pmap parity, EMA, evaluation masks."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import cnnjax
from cnnjax.train import optim, steps

HERE = os.path.dirname(__file__)


def test_sharded_and_pmap_steps_equal_the_single_device_step():
  env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
  out = subprocess.run([sys.executable, os.path.join(HERE, "parity_worker.py")], env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["steps"] == 3 and report["moved"] > 1e-3  # training really happened
  for key, value in report.items():
    if key.startswith(("mesh4", "pmap", "ghost_pmap_vs_jit")):
      assert value < 1e-5, (key, value)
  # Per-device statistics really differ from global-batch ones.
  assert report["ghost_vs_global_batch_stats"] > 1e-3 and report["ghost_vs_global_params"] > 1e-4


def _tiny():
  model = cnnjax.create_model("resnet20", num_classes=3, widths=(4, 4, 4))
  shape = optim.schedule_shape("constant", total_steps=1, steps_per_epoch=1)
  tx = optim.make_optimizer("sgd", shape, learning_rate=0.5, momentum=0.0)
  return model, tx


def test_ema_of_weights_and_batch_statistics_by_hand():
  model, tx = _tiny()
  config = steps.StepConfig(ema_decay=0.75)
  train, _ = steps.jit_steps(model, tx, config, steps.make_mesh(jax.devices()[:1]))
  state = steps.init_state(model, tx, (8, 8, 3), seed=0, ema=True)
  before = jax.device_get(state)
  batch = {"image": jax.random.normal(jax.random.key(0), (4, 8, 8, 3)), "label": jnp.arange(4) % 3}
  after, metrics = train(state, batch)
  after = jax.device_get(after)
  for ema, old, new in ((after.ema_params, before.params, after.params),
                        (after.ema_batch_stats, before.batch_stats, after.batch_stats)):
    for e, o, n in zip(jax.tree.leaves(ema), jax.tree.leaves(old), jax.tree.leaves(new)):
      np.testing.assert_allclose(e, 0.75 * o + 0.25 * n, rtol=1e-6, atol=1e-7)
  assert np.isfinite(metrics["loss"]) and float(metrics["learning_rate"]) == pytest.approx(0.5)


def test_eval_counts_only_real_examples_of_a_padded_batch():
  model, tx = _tiny()
  _, evaluate = steps.jit_steps(model, tx, steps.StepConfig(), steps.make_mesh(jax.devices()[:1]))
  state = steps.init_state(model, tx, (8, 8, 3), seed=0)
  images = jax.random.normal(jax.random.key(1), (6, 8, 8, 3))
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  full = evaluate(state, {"image": images, "label": labels, "mask": jnp.ones(6)})
  # The last two rows are padding: garbage labels must not count.
  padded = evaluate(state, {"image": images, "label": labels.at[4:].set(0),
                            "mask": jnp.array([1, 1, 1, 1, 0, 0])})
  head = evaluate(state, {"image": images[:4], "label": labels[:4], "mask": jnp.ones(4)})
  assert float(padded["count"]) == 4 and float(full["count"]) == 6
  for key in ("loss", "top1", "top5"):
    assert float(padded[key]) == pytest.approx(float(head[key]), rel=1e-5, abs=1e-5)
  assert float(full["top5"]) == 6  # 3 classes: the true one is always in the top 5


def _precision_run(dtype, loss_scale=None, num_steps=1):
  model = cnnjax.create_model("resnet20", num_classes=3, widths=(4, 4, 4), dtype=dtype)
  shape = optim.schedule_shape("constant", total_steps=1, steps_per_epoch=1)
  tx = optim.make_optimizer("sgd", shape, learning_rate=0.1)
  # Compile-bound (a float16 step compiles slowly on CPU), and what it checks is values.
  train, _ = steps.jit_steps(model, tx, steps.StepConfig(), steps.make_mesh(jax.devices()[:1]),
                             xla_options=steps.FAST_COMPILE_OPTIONS)
  state = steps.init_state(model, tx, (8, 8, 3), seed=0, loss_scale=loss_scale)
  batch = {"image": jax.random.normal(jax.random.key(0), (4, 8, 8, 3)), "label": jnp.arange(4) % 3}
  history = []
  for _ in range(num_steps):
    before = jax.device_get(state.params)
    state, metrics = train(state, batch)
    history.append((before, jax.device_get(state.params), jax.device_get(metrics)))
  return jax.device_get(state), history


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_computes_in_dtype_but_keeps_float32_state(dtype):
  state, [(before, after, metrics)] = _precision_run(dtype, loss_scale=2.0 ** 8)
  for leaf in jax.tree.leaves((state.params, state.batch_stats)):
    assert leaf.dtype == jnp.float32
  assert np.isfinite(metrics["loss"])
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before),
                                                        jax.tree.leaves(after))) > 1e-4
  model = cnnjax.create_model("resnet20", num_classes=3, widths=(4, 4, 4), dtype=dtype)
  logits = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                       jnp.zeros((1, 8, 8, 3)), train=False)
  assert logits.dtype == dtype


def test_float16_loss_scaling_skips_overflowing_steps_and_backs_off():
  state, history = _precision_run(jnp.float16, loss_scale=2.0 ** 30, num_steps=24)
  skipped = [bool(m["skipped"]) for _, _, m in history]
  scales = [float(m["loss_scale"]) for _, _, m in history]
  assert skipped[0] and not skipped[-1]  # 2^30 overflows float16; the scale comes down until not
  for (before, after, _), skip in zip(history, skipped):
    unchanged = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                         jax.tree.leaves(after)))
    assert unchanged == skip  # a skipped step leaves the params alone, a taken one moves them
  first_taken = skipped.index(False)
  assert scales[:first_taken] == [2.0 ** (29 - i) for i in range(first_taken)]


class _TwoHeads(nn.Module):
  """A stand-in for GoogLeNet's interface: (logits, aux1, aux2) in training."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1))
    logits = nn.Dense(3, name="main")(x)
    if not (train or self.is_initializing()):  # as GoogLeNet: heads exist, used in training
      return logits
    return logits, nn.Dense(3, name="aux1")(x), nn.Dense(3, name="aux2")(x)


def test_auxiliary_losses_are_weighted_by_the_config():
  model = _TwoHeads()
  shape = optim.schedule_shape("constant", total_steps=1, steps_per_epoch=1)
  tx = optim.make_optimizer("sgd", shape, learning_rate=0.1)
  state = steps.init_state(model, tx, (2, 2, 3), seed=0)
  batch = {"image": jax.random.normal(jax.random.key(3), (4, 2, 2, 3)), "label": jnp.arange(4) % 3}
  variables = {"params": state.params}
  logits, aux1, aux2 = model.apply(variables, batch["image"], train=True)
  ce = lambda out: float(steps.cross_entropy(out, batch["label"], 3).mean())  # noqa: E731
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   config=steps.StepConfig(aux_loss_weight=0.3)))
  _, metrics = step(state, batch)
  assert float(metrics["loss"]) == pytest.approx(ce(logits) + 0.3 * (ce(aux1) + ce(aux2)), rel=1e-5)
  assert float(metrics["data_loss"]) == pytest.approx(ce(logits), rel=1e-5)


def test_gradient_clipping_bounds_the_update_norm():
  model = _TwoHeads()
  shape = optim.schedule_shape("constant", total_steps=1, steps_per_epoch=1)
  tx = optim.make_optimizer("sgd", shape, learning_rate=1.0, momentum=0.0, clip_norm=1e-3)
  state = steps.init_state(model, tx, (2, 2, 3), seed=0)
  batch = {"image": 10 * jax.random.normal(jax.random.key(3), (4, 2, 2, 3)),
           "label": jnp.arange(4) % 3}
  before = jax.device_get(state.params)
  after, _ = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                       config=steps.StepConfig()))(state, batch)
  moved = np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2) for a, b in
                      zip(jax.tree.leaves(jax.device_get(after.params)), jax.tree.leaves(before))))
  assert moved == pytest.approx(1e-3, rel=1e-4)
