"""Every registered model runs forward and backward on a small input.

Numeric checks (compiled, real values: logits shape, no NaN, a non-zero
gradient for every parameter) run on one representative of every family and
code path. Compiling the backward pass of the deep variants costs 20-60 s each
on 2 CPU cores and exercises no module the representatives do not, so in CI
they are checked structurally: the abstract forward and backward passes (shapes
and gradient tree) and a dependency walk of the traced loss proving that every
parameter reaches it. Deeper twins — the same module with more repeats of the
same blocks as a variant checked here — are left to `tests/test_reference.py`
(their forward pass, parameters and FLOPs) to keep CI within its budget.
`CNNJAX_FULL_ZOO=1` runs the numeric check on all.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from tests.conftest import run_compiled_quickly

NUMERIC = {
    # name: overrides exercising the family's options
    "alexnet": {}, "alexnet_paper": {}, "vgg11": {}, "vgg11_bn": {},
    "googlenet": {"aux_logits": True}, "resnet18": {}, "resnet50": {},
    "resnet20": {}, "plain20": {}, "mobilenet_v1_025": {},
    "mobilenet_v2": {}, "efficientnet_b0": {},
}
# Reduced depth, same modules: the full variant is checked structurally.
REDUCED = {"densenet121": {"block_sizes": (2, 2, 2, 2)}}
if os.environ.get("CNNJAX_FULL_ZOO"):
  NUMERIC.update({n: {} for n in cnnjax.list_models() if n not in NUMERIC})
  REDUCED = {}
DEEPER_TWINS = {"resnet101", "resnet152", "densenet169", "densenet201", "vgg19", "vgg19_bn",
                "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "resnet110", "plain110",
                "resnet56", "plain56"}
STRUCTURAL = [n for n in cnnjax.list_models()
              if n not in NUMERIC and (os.environ.get("CNNJAX_FULL_ZOO") or n not in DEEPER_TWINS)]
NUM_CLASSES = 5


def _setup(name, overrides):
  info = cnnjax.model_info(name)
  model = cnnjax.create_model(name, num_classes=NUM_CLASSES, **overrides)
  size = max(info.min_input_size, 32)
  images = jax.random.normal(jax.random.key(0), (2, size, size, info.channels))
  labels = jnp.array([1, 3])
  return model, images, labels


def _loss_fn(model, images, labels):
  def loss(params, state):
    out, _ = model.apply({**state, "params": params}, images, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    logits = out if not isinstance(out, tuple) else out[0]
    aux = [] if not isinstance(out, tuple) else list(out[1:])
    total = sum(-jnp.mean(jax.nn.log_softmax(l)[jnp.arange(2), labels]) for l in [logits] + aux)
    return total, out
  return loss


@pytest.mark.parametrize("name,overrides", sorted({**NUMERIC, **REDUCED}.items()))
def test_forward_backward_numeric(name, overrides):
  model, images, labels = _setup(name, overrides)
  variables = run_compiled_quickly(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images))
  state = {k: v for k, v in variables.items() if k != "params"}
  (loss, out), grads = run_compiled_quickly(
      jax.value_and_grad(_loss_fn(model, images, labels), has_aux=True), variables["params"], state)
  outputs = out if isinstance(out, tuple) else (out,)
  for logits in outputs:
    assert logits.shape == (2, NUM_CLASSES)
    assert np.all(np.isfinite(logits))
  assert np.isfinite(loss)
  eval_logits = run_compiled_quickly(lambda v: model.apply(v, images, train=False), variables)
  assert eval_logits.shape == (2, NUM_CLASSES) and np.all(np.isfinite(eval_logits))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert flat, "model has no parameters"
  silent = [jax.tree_util.keystr(path) for path, g in flat
            if not np.all(np.isfinite(g)) or not np.any(g != 0)]
  assert silent == [], f"parameters without a finite non-zero gradient: {silent}"


def _inputs_reaching_outputs(jaxpr):
  """Invars of `jaxpr` that some outvar depends on (sub-calls treated as opaque)."""
  needed = {v for v in jaxpr.outvars if not isinstance(v, jax.extend.core.Literal)}
  for eqn in reversed(jaxpr.eqns):
    if any(o in needed for o in eqn.outvars):
      needed.update(v for v in eqn.invars if not isinstance(v, jax.extend.core.Literal))
  return [v in needed for v in jaxpr.invars]


@pytest.mark.parametrize("name", STRUCTURAL)
def test_forward_backward_structural(name):
  model, images, labels = _setup(name, {})
  variables = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images))
  loss = _loss_fn(model, images, labels)
  state = {k: v for k, v in variables.items() if k != "params"}
  (value, logits), grads = jax.eval_shape(jax.value_and_grad(loss, has_aux=True),
                                          variables["params"], state)
  assert logits.shape == (2, NUM_CLASSES) and value.shape == ()
  assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == \
      jax.tree.map(lambda p: (p.shape, p.dtype), variables["params"])
  closed = jax.make_jaxpr(lambda p, s: loss(p, s)[0])(variables["params"], state)
  reaching = _inputs_reaching_outputs(closed.jaxpr)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]]
  assert [n for n, r in zip(names, reaching) if not r] == []


def test_zero_init_residual_silences_each_residual_branch_at_init():
  model, images, labels = _setup("resnet18", {"zero_init_residual": True})
  variables = run_compiled_quickly(lambda: model.init({"params": jax.random.key(0)}, images))
  state = {"batch_stats": variables["batch_stats"]}
  grads, _ = run_compiled_quickly(jax.grad(_loss_fn(model, images, labels), has_aux=True),
                                  variables["params"], state)
  for block in ("layer1_0", "layer4_1"):
    assert not np.any(variables["params"][block]["bn2"]["scale"])
    # The zeroed scale still learns; what lies before it in the branch waits a step.
    assert np.any(grads[block]["bn2"]["scale"] != 0)
    assert not np.any(grads[block]["conv1"]["kernel"])
