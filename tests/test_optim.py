"""Optimizers, schedules and losses against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnnjax.train import optim, steps


def _numpy_tf_rmsprop(params, grads_seq, lr, decay, momentum, eps):
  """tf.compat.v1.train.RMSPropOptimizer: ms starts at 1, eps inside the sqrt."""
  ms = np.ones_like(params)
  mom = np.zeros_like(params)
  p = params.copy()
  for g in grads_seq:
    ms = decay * ms + (1 - decay) * g * g
    mom = momentum * mom + lr * g / np.sqrt(ms + eps)
    p = p - mom
  return p


def test_tf_rmsprop_equals_numpy_over_five_steps():
  rng = np.random.default_rng(0)
  params = rng.normal(size=(7,)).astype(np.float64)
  grads = [rng.normal(size=(7,)) for _ in range(5)]
  shape = optim.schedule_shape("constant", total_steps=5, steps_per_epoch=5)
  tx = optim.make_optimizer("rmsprop_tf", shape, learning_rate=0.016, momentum=0.9, eps=1e-3)
  p = {"w": jnp.asarray(params, jnp.float32)}
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, p)
    p = optax.apply_updates(p, updates)
  expected = _numpy_tf_rmsprop(params, grads, 0.016, 0.9, 0.9, 1e-3)
  np.testing.assert_allclose(p["w"], expected, rtol=1e-5, atol=1e-6)


def test_learning_rate_and_weight_decay_are_values_in_the_state():
  shape = optim.schedule_shape("constant", total_steps=10, steps_per_epoch=10)
  tx = optim.make_optimizer("sgd", shape, learning_rate=0.1, weight_decay=1e-4)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
  state = tx.init(params)
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(0.1)

  @jax.jit
  def update(state, params):
    return tx.update(jax.tree.map(jnp.zeros_like, params), state, params)

  update(state, params)
  # A different learning rate is a different value, not a different program.
  state.hyperparams["learning_rate"] = jnp.float32(0.5)
  state.hyperparams["weight_decay"] = jnp.float32(0.5)
  updates, _ = update(state, params)
  assert update._cache_size() == 1
  # Decoupled decay: zero gradient, update = -lr * wd * p on kernels, nothing on biases.
  np.testing.assert_allclose(updates["kernel"], -0.25 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates["bias"], np.zeros(2))


def test_schedules_with_warmup():
  spe = 10
  cosine = optim.schedule_shape("cosine", total_steps=100, steps_per_epoch=spe, warmup_epochs=1)
  assert float(cosine(0)) == pytest.approx(0.1, rel=1e-5) and float(cosine(9)) == pytest.approx(1.0)
  assert float(cosine(10)) == pytest.approx(1.0)
  assert float(cosine(55)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 45 / 90)), rel=1e-5)
  expo = optim.schedule_shape("exponential", total_steps=1000, steps_per_epoch=spe)
  # x0.97 every 2.4 epochs = 24 steps, staircase.
  assert [float(expo(s)) for s in (0, 23, 24, 48)] == pytest.approx([1, 1, 0.97, 0.97**2])
  multi = optim.schedule_shape("multistep", total_steps=100, steps_per_epoch=spe,
                               boundaries_epochs=(3, 6))
  assert [float(multi(s)) for s in (29, 30, 59, 60)] == pytest.approx([1, 0.1, 0.1, 0.01])
  with pytest.raises(ValueError, match="unknown schedule 'cosin'"):
    optim.schedule_shape("cosin", 10, 10)
  assert optim.peak_learning_rate(0.016, 4096, True) == pytest.approx(0.256)


def test_coupled_l2_penalty_skips_batchnorm_and_biases():
  params = {"conv": {"kernel": jnp.full((3, 3, 2, 2), 2.0), "bias": jnp.ones(2)},
            "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
  assert float(optim.l2_penalty(params, 1e-2)) == pytest.approx(1e-2 * 0.5 * 36 * 4)


def test_label_smoothed_cross_entropy_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  loss = steps.cross_entropy(logits, jnp.array([0]), 3, label_smoothing=0.3)
  log_p = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
  target = np.array([0.7 + 0.1, 0.1, 0.1])
  assert float(loss[0]) == pytest.approx(-(target * log_p).sum(), rel=1e-6)


def test_bad_optimizer_settings_are_named():
  shape = optim.schedule_shape("constant", 10, 10)
  with pytest.raises(ValueError, match="unknown optimizer 'adamm'"):
    optim.make_optimizer("adamm", shape, 0.1)
  with pytest.raises(ValueError, match="learning rate must be positive"):
    optim.make_optimizer("sgd", shape, -1.0)
  with pytest.raises(ValueError, match="adamw decouples"):
    optim.make_optimizer("adamw", shape, 0.1, weight_decay_mode="coupled")


def _trust(w, u, coefficient, is_kernel):
  if not is_kernel:
    return 1.0
  wn, un = np.linalg.norm(w), np.linalg.norm(u)
  return coefficient * wn / un if wn > 0 and un > 0 else 1.0


def _numpy_lars(params, grads_seq, lr, wd, momentum, coefficient):
  """You et al. 2017: v = m v + lr * trust * (g + wd w) per layer; kernels only get trust/decay."""
  p = {k: v.copy() for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  for grads in grads_seq:
    for k in p:
      kernel = p[k].ndim > 1
      u = grads[k] + (wd * p[k] if kernel else 0.0)
      v[k] = momentum * v[k] + lr * _trust(p[k], u, coefficient, kernel) * u
      p[k] = p[k] - v[k]
  return p


def _numpy_lamb(params, grads_seq, lr, wd, b1, b2, eps):
  """You et al. 2020: bias-corrected Adam direction plus decay, scaled by ||w|| / ||r||."""
  p = {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros_like(x) for k, x in params.items()}
  s = {k: np.zeros_like(x) for k, x in params.items()}
  for t, grads in enumerate(grads_seq, start=1):
    for k in p:
      kernel = p[k].ndim > 1
      m[k] = b1 * m[k] + (1 - b1) * grads[k]
      s[k] = b2 * s[k] + (1 - b2) * grads[k] ** 2
      r = (m[k] / (1 - b1 ** t)) / (np.sqrt(s[k] / (1 - b2 ** t)) + eps)
      r = r + (wd * p[k] if kernel else 0.0)
      p[k] = p[k] - lr * _trust(p[k], r, 1.0, kernel) * r
  return p


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_lars_and_lamb_equal_numpy_over_three_steps(name):
  rng = np.random.default_rng(1)
  params = {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))}
  grads = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(3)]
  shape = optim.schedule_shape("constant", total_steps=3, steps_per_epoch=3)
  tx = optim.make_optimizer(name, shape, learning_rate=0.5, weight_decay=0.01,
                            weight_decay_mode="decoupled", momentum=0.9, trust_coefficient=0.02)
  p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = tx.init(p)
  for g in grads:
    updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
    p = optax.apply_updates(p, updates)
  if name == "lars":
    expected = _numpy_lars(params, grads, 0.5, 0.01, 0.9, 0.02)
  else:
    expected = _numpy_lamb(params, grads, 0.5, 0.01, 0.9, 0.999, 1e-6)
  for key in params:
    np.testing.assert_allclose(p[key], expected[key], rtol=2e-5, atol=1e-6)
  moved = np.abs(np.asarray(p["kernel"]) - params["kernel"]).max()
  assert moved > 1e-3
