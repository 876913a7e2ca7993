"""cnnjax's BatchNorm against flax.linen.BatchNorm: variables, outputs, statistics and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from cnnjax.models import batchnorm
from cnnjax.models.batchnorm import BatchNorm

SETTINGS = dict(momentum=0.9, epsilon=1e-5)


def _input(shape, seed=0, dead_feature=True):
  """Post-ReLU-like data, offset from zero; feature 0 all zero (a dead channel) if asked."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(seed), shape) * 2.0 + 0.5)
  return x.at[..., 0].set(0.0) if dead_feature else x


def _variables(features, seed=1):
  keys = jax.random.split(jax.random.key(seed), 4)
  return {"params": {"scale": jax.random.uniform(keys[0], (features,), minval=0.5, maxval=1.5),
                     "bias": jax.random.normal(keys[1], (features,)) * 0.1},
          "batch_stats": {"mean": jax.random.normal(keys[2], (features,)) * 0.1,
                          "var": jax.random.uniform(keys[3], (features,), minval=0.5, maxval=2.0)}}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_variables_outputs_and_running_statistics_as_flax(dtype):
  x = _input((4, 5, 6, 8)).astype(dtype)
  ours = BatchNorm(dtype=dtype, unbiased_running_var=False, **SETTINGS)
  theirs = nn.BatchNorm(dtype=dtype, **SETTINGS)
  init_ours = ours.init(jax.random.key(0), x, use_running_average=False)
  init_theirs = theirs.init(jax.random.key(0), x, use_running_average=False)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), init_ours) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), init_theirs)
  variables = _variables(8)
  trained_state = None
  for train in (True, False):
    y_ours, state_ours = ours.apply(variables, x, use_running_average=not train,
                                    mutable=["batch_stats"])
    y_theirs, state_theirs = theirs.apply(variables, x, use_running_average=not train,
                                          mutable=["batch_stats"])
    assert y_ours.dtype == y_theirs.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y_ours, np.float32), np.asarray(y_theirs, np.float32))
    jax.tree.map(np.testing.assert_array_equal, state_ours, state_theirs)
    trained_state = trained_state or state_ours
  # Training moved the running statistics (the comparison above is not vacuous).
  assert not np.allclose(trained_state["batch_stats"]["mean"], variables["batch_stats"]["mean"])


def _loss(module, variables, x, weights):
  """A loss that weighs every output element differently, through a ReLU as in the models."""
  y = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])[0]
  return jnp.sum(jax.nn.relu(y) * weights)


def test_the_running_variance_averages_the_unbiased_batch_variance_as_pytorch():
  """PyTorch: running_var = (1 - m) running_var + m * var(x, unbiased); cnnjax's momentum is
  1 - m. Computed here independently with numpy."""
  x = _input((3, 2, 2, 5))
  module = BatchNorm(momentum=0.9, epsilon=1e-5)
  variables = module.init(jax.random.key(0), x, use_running_average=False)
  _, state = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  flat = np.asarray(x, np.float64).reshape(-1, 5)
  np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1),
                             rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize("shape", [(8, 6, 6, 16), (2, 3, 3, 5), (64, 7)])
def test_gradients_match_flax_autodiff(shape):
  x = _input(shape)
  weights = jax.random.normal(jax.random.key(2), shape)
  variables = _variables(shape[-1])
  def grad(module):
    return jax.jit(jax.grad(functools.partial(_loss, module), argnums=(0, 1)))(
        variables, x, weights)

  ours, theirs = grad(BatchNorm(**SETTINGS)), grad(nn.BatchNorm(**SETTINGS))
  # Gradients vanish only where they should (the dead feature's input gradient is
  # not zero: the bias still moves its outputs).
  assert float(jnp.abs(ours[1]).max()) > 0.1
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * float(jnp.abs(b).max()))


def test_gradients_match_flax_across_a_named_axis():
  """Statistics averaged over a named axis (pmap's cross-device BatchNorm), here under vmap."""
  x = _input((4, 6, 5, 5, 8))  # 4 "devices" of 6 images each
  weights = jax.random.normal(jax.random.key(3), x.shape)
  variables = _variables(8)

  def grads(module):
    per_device = jax.vmap(jax.grad(functools.partial(_loss, module), argnums=(0, 1)),
                          in_axes=(None, 0, 0), axis_name="devices")
    return jax.jit(per_device)(variables, x, weights)

  ours = grads(BatchNorm(axis_name="devices", **SETTINGS))
  theirs = grads(nn.BatchNorm(axis_name="devices", **SETTINGS))
  local = grads(nn.BatchNorm(**SETTINGS))
  # The named axis matters: per-device statistics give other gradients.
  assert not np.allclose(local[1], theirs[1], atol=1e-3)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * float(jnp.abs(b).max()))


def test_gradient_through_the_returned_statistics():
  """A caller that differentiates the batch mean and variance gets their exact cotangents."""
  x = _input((6, 4, 4, 3), dead_feature=False)
  scale, bias = jnp.array([1.2, 0.7, 1.0]), jnp.array([0.1, -0.2, 0.0])
  static = batchnorm._Static(1e-5, None, None, jnp.float32)
  weights = jax.random.normal(jax.random.key(4), x.shape)

  def ours(x, scale, bias):
    y, mean, var = batchnorm._batch_norm(x, scale, bias, static)
    return jnp.sum(y * weights) + jnp.sum(jnp.sin(mean)) + jnp.sum(var ** 2)

  def plain(x, scale, bias):
    mean, var = batchnorm.batch_statistics(x, static)
    y = batchnorm._normalize(x, mean, var, scale, bias, 1e-5)
    return jnp.sum(y * weights) + jnp.sum(jnp.sin(mean)) + jnp.sum(var ** 2)

  grads = [jax.jit(jax.grad(f, (0, 1, 2)))(x, scale, bias) for f in (ours, plain)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * float(jnp.abs(b).max()))


def test_other_feature_axes_are_refused():
  with pytest.raises(ValueError, match="last .feature. axis"):
    BatchNorm(axis=1).init(jax.random.key(0), jnp.ones((2, 3, 4)), use_running_average=False)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "densenet121", "vgg11_bn",
                                  "googlenet", "mobilenet_v1", "mobilenet_v2", "efficientnet_b0"])
def test_every_normalising_model_uses_it_by_default(name):
  """The fast path is the default: every normalisation layer the model calls is cnnjax's."""
  import cnnjax  # noqa: PLC0415

  model = cnnjax.create_model(name, num_classes=10)
  norm_classes = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and "Norm" in type(context.module).__name__:
      norm_classes.append(type(context.module))
    return next_fun(*args, **kwargs)

  size = max(cnnjax.model_info(name).min_input_size, 32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, size, size, 3)),
                                      train=True))
  assert norm_classes and set(norm_classes) == {BatchNorm}, (name, set(norm_classes))
