"""`zero_init_residual`: every residual branch starts silent, so a deeper network starts as the
shallower one. Proven by function, not by inspecting the zeroed scales alone: the shallow
network, given the deep one's stem, head and first blocks, computes the deep one's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from tests.conftest import run_compiled_quickly


def _logits(model, variables, images, train):
  def forward(variables, images):
    out = model.apply(variables, images, train=train, mutable=["batch_stats"] if train else False)
    return out[0] if train else out
  return np.asarray(run_compiled_quickly(forward, variables, images))


def _shallow_variables(deep_variables, shallow_template, block_names):
  """The shallow network's variables taken from the deep one's: the same name where it exists,
  and each shallow block from the deep block that `block_names` maps it to."""
  return {collection: {name: deep_variables[collection][block_names.get(name, name)]
                       for name in shallow_template[collection]}
          for collection in shallow_template}


def test_a_zero_initialised_cifar_resnet56_starts_as_resnet20():
  train = True  # batch statistics, not the initial running ones: each block sees real inputs
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  deep = cnnjax.create_model("resnet56", zero_init_residual=True, widths=(4, 8, 8))
  shallow = cnnjax.create_model("resnet20", zero_init_residual=True, widths=(4, 8, 8))
  deep_vars = run_compiled_quickly(deep.init, jax.random.key(0), images)
  shallow_template = jax.eval_shape(shallow.init, jax.random.key(0), images)
  # resnet20's blocks stage{s}_{0..2} from resnet56's stage{s}_{0..2}: same names.
  shallow_vars = _shallow_variables(deep_vars, shallow_template, {})
  np.testing.assert_allclose(_logits(shallow, shallow_vars, images, train),
                             _logits(deep, deep_vars, images, train), rtol=1e-5, atol=1e-6)
  # Without it the deep network's extra blocks change the function.
  plain_init = cnnjax.create_model("resnet56", widths=(4, 8, 8))
  ones = run_compiled_quickly(plain_init.init, jax.random.key(0), images)
  assert not np.allclose(_logits(shallow, _shallow_variables(ones, shallow_template, {}), images,
                                 train), _logits(plain_init, ones, images, train), atol=1e-4)


def test_a_zero_initialised_deep_efficientnet_starts_as_the_shallow_one():
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  options = dict(width=0.25, channel_divisor=1, dropout=0.0, zero_init_residual=True)
  deep = cnnjax.create_model("efficientnet", depth=0.6, **options)
  shallow = cnnjax.create_model("efficientnet", depth=0.25, **options)
  # Each shallow stage is the first block of the deep stage: the deep stage's other blocks are
  # residual (stride 1, same width) and start as the identity.
  firsts, seen = [], set()
  for index, spec in enumerate(deep.blocks):
    if spec.stage not in seen:
      seen.add(spec.stage)
      firsts.append(index)
  assert len(firsts) == len(shallow.blocks) < len(deep.blocks)
  assert all(not (s.stride == 1 and s.in_features == s.out_features) for s in shallow.blocks)
  mapping = {f"block{i}": f"block{deep_index}" for i, deep_index in enumerate(firsts)}
  deep_vars = run_compiled_quickly(deep.init, jax.random.key(0), images)
  shallow_vars = _shallow_variables(deep_vars, jax.eval_shape(shallow.init, jax.random.key(0),
                                                              images), mapping)
  np.testing.assert_allclose(_logits(shallow, shallow_vars, images, False),
                             _logits(deep, deep_vars, images, False), rtol=1e-5, atol=1e-6)
  # Only residual blocks are zeroed: a block without a shortcut would pass nothing on.
  for index, spec in enumerate(deep.blocks):
    scale = deep_vars["params"][f"block{index}"]["bn_project"]["scale"]
    residual = spec.stride == 1 and spec.in_features == spec.out_features
    assert (not np.any(scale)) if residual else np.all(scale == 1.0), index


def test_zero_init_residual_is_off_by_default_and_refused_for_plain_networks():
  assert not cnnjax.create_model("resnet18").zero_init_residual
  assert not cnnjax.create_model("mobilenet_v2").zero_init_residual
  with pytest.raises(ValueError, match="plain network has no shortcut.*resnet"):
    jax.eval_shape(cnnjax.create_model("plain20", zero_init_residual=True).init,
                   jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
