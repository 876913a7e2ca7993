"""Training parity with PyTorch: the same network trained on the same batches ends the same.

Forward parity (tests/test_weights_torch.py) cannot see what only training
uses: BatchNorm's backward pass and its running statistics, the weight-decay
mask, the optimizer's wiring. Here one network of each family with residual
or dense connections (the reduced-width twins of `torch_models.NARROW`) is
initialised in cnnjax, written with `save_weights` and loaded strictly into
torchvision/timm. Both train 20 steps on the same batches with SGD with
momentum and coupled decay (PyTorch's `weight_decay`, cnnjax's `sgd`), and
with AdamW (decoupled decay), decaying the same parameters (kernels, not
BatchNorm or biases: torch parameter groups, cnnjax's `decay_mask`), with
BatchNorm in training mode and dropout and drop path off, all in float64.

The bound is derived, not picked. Two float64 implementations differ only by
rounding, and what rounding does to 20 steps of training is measured: PyTorch
trains again from its weights moved by one unit of float64 roundoff, and the
spread between its two runs up to step k is the rounding noise at step k.
cnnjax must stay within 2^8 times that (each of its operations rounds, not only
its start; sums in other orders, other convolution algorithms), with a floor of
1e-13 where the spread is below any measurable noise; its trained variables
(parameters and BatchNorm statistics) likewise. Where training is smooth that
bound is ~1e-10 and over the first steps far below float32's own noise
(PyTorch in float32 against float64, asserted). Where a small network's
training is chaotic (rounding grows ~10x a step), the bound grows with it, as
the measured noise does: the parity then holds as far as float64 can tell. A
saboteur, cnnjax with one thing changed (BatchNorm's momentum, the decay mask,
the biased running variance), must land outside it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import cnnjax  # noqa: E402
from cnnjax import weights  # noqa: E402
from cnnjax.models.batchnorm import BatchNorm  # noqa: E402
from cnnjax.train import optim, steps  # noqa: E402

import torch_models  # noqa: E402  (tests/ is on sys.path under pytest)

pytestmark = pytest.mark.torch

STEPS, BATCH = 20, 16
ROUNDOFF = 2.0**-52  # float64's unit roundoff
ALLOWANCE = 2.0**8
FLOOR = 1e-13  # about 500 roundoffs of a loss near ln 10: where the spread is below noise
# Powers of two: cnnjax keeps the learning rate and decay as float32 hyperparameters (so that a
# sweep changing them does not recompile), which must not round them here.
OPTIMIZERS = {"sgd": dict(learning_rate=2.0**-7, weight_decay=2.0**-8, momentum=0.9),
              "adamw": dict(learning_rate=2.0**-11, weight_decay=2.0**-4)}
# family -> (NARROW key, cnnjax overrides that turn dropout and drop path off, the torch kwargs)
FAMILIES = {
    "resnet": ("resnet18", {}, {}),
    "densenet": ("densenet121", {}, {}),
    "mobilenet_v2": ("mobilenet_v2", {"dropout": 0.0}, {"dropout": 0.0}),
    "efficientnet": ("efficientnet", {"dropout": 0.0, "drop_path": 0.0},
                     {"drop_rate": 0.0, "drop_path_rate": 0.0}),
}


# Larger than the narrow twins' smallest size where a small network's last maps would be 1x1:
# BatchNorm over one value per image makes 20 steps chaotic (rounding grows 1e3x a step, so
# no rounding-derived bound holds by step 8).
SIZES = {"mobilenet_v2": 64}


def _batches(size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((BATCH, size, size, 3)),
           rng.integers(0, torch_models.NUM_CLASSES, BATCH)) for _ in range(STEPS)]


def _torch_run(model, batches, optimizer: str, dtype):
  """Losses per step and the final state_dict of PyTorch training `model` (a copy)."""
  model = model.to(dtype).train()
  decay = [p for p in model.parameters() if p.ndim > 1]
  rest = [p for p in model.parameters() if p.ndim <= 1]
  settings = OPTIMIZERS[optimizer]
  groups = [{"params": decay, "weight_decay": settings["weight_decay"]},
            {"params": rest, "weight_decay": 0.0}]
  if optimizer == "sgd":
    opt = torch.optim.SGD(groups, lr=settings["learning_rate"], momentum=settings["momentum"])
  else:
    opt = torch.optim.AdamW(groups, lr=settings["learning_rate"], eps=1e-8)
  losses = []
  for images, labels in batches:
    opt.zero_grad()
    logits = model(torch.from_numpy(images.transpose(0, 3, 1, 2)).to(dtype))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
  return np.asarray(losses), {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def _cnnjax_run(name, overrides, variables, batches, optimizer: str):
  """Losses per step and the final variables of cnnjax's own train step, in float64."""
  settings = OPTIMIZERS[optimizer]
  # SGD's decay enters the gradient before the momentum, as PyTorch's `weight_decay`.
  tx = optim.make_optimizer(optimizer, optim.schedule_shape("constant", STEPS, STEPS),
                            settings["learning_rate"], weight_decay=settings["weight_decay"],
                            **({"momentum": settings["momentum"]} if optimizer == "sgd" else {}))
  model = cnnjax.create_model(name, num_classes=torch_models.NUM_CLASSES, dtype=jnp.float64,
                              param_dtype=jnp.float64, **overrides)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                           batch_stats=variables["batch_stats"],
                           opt_state=tx.init(variables["params"]), rng=jax.random.key(0))
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                   config=steps.StepConfig()))
  losses = []
  for images, labels in batches:
    state, metrics = step(state, {"image": jnp.asarray(images), "label": jnp.asarray(labels)})
    losses.append(float(metrics["data_loss"]))
  return np.asarray(losses), {"params": state.params, "batch_stats": state.batch_stats}


def _distance(a, b) -> float:
  """The largest difference of any entry, relative to that array's largest magnitude (at least
  1e-3: BatchNorm offsets start at 0)."""
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max() / max(np.abs(y).max(), 1e-3))
             for x, y in pairs)


def _in_cnnjax_layout(setup, state_dict) -> dict:
  """A PyTorch state_dict as cnnjax variables in float64 (cnnjax's own reader; exact)."""
  return weights.load_weights(setup.name, state_dict, num_classes=torch_models.NUM_CLASSES,
                              dtype=jnp.float64, param_dtype=jnp.float64, **setup.overrides)


@dataclasses.dataclass
class Setup:
  name: str
  overrides: dict
  torch_model: object
  variables: dict
  batches: list


def _setup(family, tmp_path) -> Setup:
  key, off, torch_off = FAMILIES[family]
  name, overrides, build, size = torch_models.NARROW[key]
  overrides = {**overrides, **off}
  model = cnnjax.create_model(name, num_classes=torch_models.NUM_CLASSES, **overrides)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(1), jnp.zeros((1, size, size, 3)))
  path = weights.save_weights(name, variables, tmp_path / "init.safetensors", **overrides)
  torch.set_num_threads(1)  # deterministic sums; the bound needs no more than rounding
  torch_model = build(**torch_off)
  torch_model.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
  if family == "efficientnet":
    # timm's tf_efficientnet ports keep PyTorch's BatchNorm momentum (they are for inference
    # and fine-tuning); cnnjax trains with the TensorFlow original's 0.99, torch's 0.01.
    for module in torch_model.modules():
      if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        module.momentum = 0.01
  with jax.enable_x64(True):
    variables64 = weights.load_weights(name, path, num_classes=torch_models.NUM_CLASSES,
                                       dtype=jnp.float64, param_dtype=jnp.float64, **overrides)
  return Setup(name, overrides, torch_model, variables64, _batches(SIZES.get(family, size)))


def _perturbed(model, seed: int = 5):
  """`model` in float64 with every parameter moved by one unit of float64 roundoff (relative)."""
  model = copy.deepcopy(model).double()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.mul_(1 + ROUNDOFF * torch.randn(parameter.shape, generator=generator,
                                                dtype=torch.float64))
  return model


def _check(setup, optimizer, overrides=None):
  """cnnjax's distances from PyTorch in float64 (losses per step, trained variables) and the
  bounds that float64 rounding alone allows (see the module docstring)."""
  losses32, _ = _torch_run(copy.deepcopy(setup.torch_model), setup.batches, optimizer,
                           torch.float32)
  losses64, state64 = _torch_run(copy.deepcopy(setup.torch_model), setup.batches, optimizer,
                                 torch.float64)
  nudged, nudged_state = _torch_run(_perturbed(setup.torch_model), setup.batches, optimizer,
                                    torch.float64)
  with jax.enable_x64(True):
    theirs, theirs_nudged = _in_cnnjax_layout(setup, state64), _in_cnnjax_layout(setup,
                                                                                 nudged_state)
    losses, ours = _cnnjax_run(setup.name, {**setup.overrides, **(overrides or {})},
                               setup.variables, setup.batches, optimizer)
    rounding_state = _distance(theirs_nudged, theirs)
    state_gap = _distance(ours, theirs)
  # What rounding alone does by step k: the largest spread at or before it.
  rounding = np.maximum.accumulate(np.abs(nudged - losses64))
  return Gaps(loss=np.abs(losses - losses64), loss_bound=ALLOWANCE * np.maximum(rounding, FLOOR),
              state=state_gap, state_bound=ALLOWANCE * max(rounding_state, FLOOR),
              float32_noise=np.abs(losses32 - losses64))


@dataclasses.dataclass
class Gaps:
  loss: np.ndarray  # per step
  loss_bound: np.ndarray
  state: float
  state_bound: float
  float32_noise: np.ndarray

  def __str__(self) -> str:
    np.set_printoptions(precision=1)
    return (f"losses {self.loss} against bounds {self.loss_bound} (float32 noise "
            f"{self.float32_noise}); trained variables {self.state:.1e} against "
            f"{self.state_bound:.1e}")


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_losses_and_the_trained_state_equal_pytorchs(family, optimizer, tmp_path):
  setup = _setup(family, tmp_path)
  gaps = _check(setup, optimizer)
  assert np.all(gaps.loss <= gaps.loss_bound), f"{family}/{optimizer}: {gaps}"
  assert gaps.state <= gaps.state_bound, f"{family}/{optimizer}: {gaps}"
  # Over the first steps the bound is far below what float32 alone would do: not vacuous.
  assert np.all(gaps.loss_bound[:5] < gaps.float32_noise[:5].max()), f"{family}/{optimizer}: {gaps}"


def _norm_with(**fields):
  return functools.partial(BatchNorm, **{"momentum": 0.9, "epsilon": 1e-5, **fields})


@pytest.mark.parametrize("sabotage", ["batchnorm_momentum", "decay_mask", "biased_running_var"])
def test_a_saboteur_lands_outside_the_bound(sabotage, tmp_path, monkeypatch):
  setup = _setup("resnet", tmp_path)
  overrides = {}
  if sabotage == "decay_mask":  # BatchNorm scales and biases decayed too
    monkeypatch.setattr(optim, "decay_mask", lambda params: jax.tree.map(lambda p: True, params))
  elif sabotage == "batchnorm_momentum":
    overrides = {"norm": _norm_with(momentum=0.8)}
  else:
    overrides = {"norm": _norm_with(unbiased_running_var=False)}
  gaps = _check(setup, "sgd", overrides)
  assert np.any(gaps.loss > gaps.loss_bound) or gaps.state > gaps.state_bound, f"{sabotage}: {gaps}"
