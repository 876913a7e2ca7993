"""Each platform gets its own lowering, decided when the computation is lowered for it.

No GPU or TPU is needed: `jax.export` lowers for them from this CPU process. On
`cuda` and `tpu` a model's training-mode forward and backward pass, and
cnnjax's own train step, must hold exactly the convolution, reduce_window and
select_and_scatter ops of the plain XLA lowering (`lowering.use("xla")`) and
no CPU-only custom call or host callback; on `cpu` the fast path must stay.
"""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import pytest

import cnnjax
from cnnjax.models import lowering
from cnnjax.train import optim, steps

# One network of every family, small enough to trace quickly; the same modules as the zoo.
FAMILIES = {
    "alexnet": {}, "alexnet_paper": {}, "vgg11_bn": {}, "googlenet": {"aux_logits": True},
    "resnet18": {}, "resnet20": {"widths": (4, 8, 16)},
    "densenet121": {"block_sizes": (2, 2, 2, 2), "growth_rate": 8},
    "mobilenet_v1_025": {}, "mobilenet_v2": {"width": 0.25},
    "efficientnet_b0": {"width": 0.25, "depth": 0.25},
}
ACCELERATORS = ("cuda", "tpu")
COUNTED = ("stablehlo.convolution", "stablehlo.reduce_window", "stablehlo.select_and_scatter",
           "stablehlo.dot_general")


def _setup(name, overrides):
  info = cnnjax.model_info(name)
  model = cnnjax.create_model(name, num_classes=5, **overrides)
  size = max(info.min_input_size, 32)
  images = jax.ShapeDtypeStruct((2, size, size, info.channels), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x),
      images)
  return model, images, variables


def _training_gradient(model):
  def loss(params, batch_stats, images):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                         mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    return sum(jnp.sum(logits) for logits in (out if isinstance(out, tuple) else (out,)))
  return jax.grad(loss)


def _export(fn, args, platform, mode):
  with lowering.use(mode):
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


def ops(module: str) -> collections.Counter:
  """The counted ops, and every custom call by target."""
  counts = collections.Counter()
  for op in COUNTED:
    counts[op] = len(re.findall(re.escape(op) + r"\b", module))
  for target in re.findall(r"stablehlo\.custom_call\s*@([\w.$-]+)", module):
    counts[f"custom_call {target}"] += 1
  for target in re.findall(r'call_target_name\s*=\s*"([^"]+)"', module):
    counts[f"custom_call {target}"] += 1
  return counts


def _assert_accelerator_program(module: str, reference: str, platform: str):
  got, want = ops(module), ops(reference)
  for op in COUNTED:
    assert got[op] == want[op], (platform, op, got[op], want[op])
  custom = {k for k in got if k.startswith("custom_call")}
  assert custom == {k for k in want if k.startswith("custom_call")}, custom
  assert not any("callback" in k or "cpu" in k.lower() for k in custom), custom


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_accelerators_get_plain_xla_convolutions_and_pooling(name):
  model, images, variables = _setup(name, FAMILIES[name])
  args = (variables["params"], variables.get("batch_stats", {}), images)
  grad = _training_gradient(model)
  for platform in ACCELERATORS:
    module = _export(grad, args, platform, "auto")
    _assert_accelerator_program(module, _export(grad, args, platform, "xla"), platform)
    assert ops(module)["stablehlo.convolution"] > 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "googlenet"])
def test_cpu_keeps_the_fast_path(name):
  model, images, variables = _setup(name, FAMILIES[name])
  args = (variables["params"], variables.get("batch_stats", {}), images)
  grad = _training_gradient(model)
  fast, plain = ops(_export(grad, args, "cpu", "auto")), ops(_export(grad, args, "cpu", "xla"))
  # Pointwise, im2col and depthwise layers leave XLA's convolution; max-pool
  # gradients leave select_and_scatter.
  assert fast["stablehlo.convolution"] < plain["stablehlo.convolution"] / 2, (fast, plain)
  assert fast["stablehlo.dot_general"] > plain["stablehlo.dot_general"]
  assert fast["stablehlo.select_and_scatter"] == 0
  assert plain["stablehlo.select_and_scatter"] > 0 or name == "mobilenet_v2"


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_cnnjax_train_step_exports_for_accelerators(name):
  model, images, variables = _setup(name, FAMILIES[name])
  tx = optim.make_optimizer("sgd", optim.schedule_shape("constant", 1, 1), learning_rate=0.1,
                            momentum=0.9)
  state = jax.eval_shape(functools.partial(steps.create_state, model, tx, images.shape[1:], 0))
  batch = {"image": images, "label": jax.ShapeDtypeStruct((images.shape[0],), jnp.int32)}
  step = functools.partial(steps.train_step, model=model, tx=tx, config=steps.StepConfig())
  for platform in ACCELERATORS:
    module = _export(step, (state, batch), platform, "auto")
    _assert_accelerator_program(module, _export(step, (state, batch), platform, "xla"),
                                platform)


def test_unknown_platforms_and_modes_name_the_valid_ones():
  with pytest.raises(ValueError, match=r"unknown platform 'metal'.*'cpu', 'gpu', 'cuda'"):
    lowering.compiler_options("metal")
  with pytest.raises(ValueError, match=r"unknown convolution lowering 'fast'.*'auto', 'xla'"):
    with lowering.use("fast"):
      pass
  assert lowering.compiler_options("cuda") == {} == lowering.compiler_options("tpu")


def test_the_platform_choice_leaves_no_conditional_in_the_compiled_program():
  # Lowered for one platform, each `Conv` and `max_pool` is a `stablehlo.case` on a constant
  # platform index; XLA must fold it away, or every layer would pay for a branch at run time.
  model, images, variables = _setup("resnet18", FAMILIES["resnet18"])
  args = (variables["params"], variables.get("batch_stats", {}), images)
  lowered = jax.jit(_training_gradient(model)).trace(*args).lower()
  assert lowered.as_text().count("stablehlo.case") > 0
  compiled = lowered.compile(compiler_options=steps.FAST_COMPILE_OPTIONS).as_text()
  assert re.findall(r"\bconditional\(", compiled) == []
