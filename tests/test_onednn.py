"""oneDNN's convolutions as a lowering: built where its parts are installed, exact to an
independent computation in both layouts, chosen only by measurement, and runnable from the
step cache in a process that has not traced the step."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cnnjax
from cnnjax.models import lowering, onednn, tuning

REPO = os.path.dirname(os.path.dirname(__file__))
NHWC = ("NHWC", "HWIO", "NHWC")


def _installed(distribution):
  try:
    importlib.metadata.distribution(distribution)
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


INGREDIENTS = (_installed("onednn-cpu-gomp") and _installed("onednn-devel")
               and shutil.which(os.environ.get("CXX", "g++")) is not None)
needs_onednn = pytest.mark.skipif(not INGREDIENTS, reason="oneDNN or a C++ compiler is missing")


def test_it_builds_where_its_parts_are_installed_and_says_what_is_missing_elsewhere():
  if INGREDIENTS:  # `make install` installs them on x86-64 Linux
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.version().startswith("3.")
  else:
    assert not onednn.available()
    assert any(word in onednn.unavailable_reason() for word in ("onednn", "compiler"))


def test_a_missing_compiler_is_a_reason_not_an_error(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", "no-such-compiler")
  monkeypatch.setenv(onednn.ENV_DIR, str(tmp_path))  # nothing built there yet
  onednn._build.cache_clear()
  try:
    build = onednn._build()
  finally:
    onednn._build.cache_clear()
  assert build.library is None
  assert "no-such-compiler" in build.reason or "onednn" in build.reason


def test_the_switch_opts_out_and_rejects_other_values(monkeypatch):
  monkeypatch.setenv(onednn.ENV_SWITCH, "0")
  assert not onednn.available() and not onednn.register()
  assert "CNNJAX_ONEDNN=0" in onednn.unavailable_reason()
  monkeypatch.setenv(onednn.ENV_SWITCH, "maybe")
  with pytest.raises(ValueError, match="CNNJAX_ONEDNN='maybe'.*set it to 0"):
    onednn.enabled()


def _reference(x, w, strides, pads, dilation, cotangent):
  """The convolution, and the gradients of <conv(x, w), cotangent>, by loops over the
  kernel's offsets in float64 numpy."""
  x, w, cotangent = (np.asarray(a, np.float64) for a in (x, w, cotangent))
  (sh, sw), (dh, dw) = strides, dilation
  padded = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  out_h, out_w = cotangent.shape[1:3]
  y = np.zeros(cotangent.shape)
  grad_padded, grad_w = np.zeros_like(padded), np.zeros_like(w)
  for i in range(w.shape[0]):
    for j in range(w.shape[1]):
      rows = slice(i * dh, i * dh + (out_h - 1) * sh + 1, sh)
      cols = slice(j * dw, j * dw + (out_w - 1) * sw + 1, sw)
      view = padded[:, rows, cols, :]
      y += view @ w[i, j]
      grad_w[i, j] = np.einsum("nhwc,nhwo->co", view, cotangent)
      grad_padded[:, rows, cols, :] += cotangent @ w[i, j].T
  height, width = x.shape[1:3]
  grad_x = grad_padded[:, pads[0][0]:pads[0][0] + height, pads[1][0]:pads[1][0] + width]
  return y, grad_x, grad_w


GEOMETRIES = [  # input, kernel, strides, pads, dilation
    ((2, 9, 11, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 10, 9, 3), (7, 7, 3, 8), (2, 2), ((3, 2), (3, 3)), (1, 1)),    # a stem, uneven pads
    ((1, 12, 12, 4), (3, 3, 4, 6), (2, 1), ((0, 1), (2, 0)), (2, 1)),   # dilated
    ((2, 8, 8, 16), (1, 1, 16, 8), (2, 2), ((0, 0), (0, 0)), (1, 1)),   # strided 1x1
]


@needs_onednn
@pytest.mark.parametrize("layout", list(onednn.LAYOUTS))
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g[1])))
def test_values_and_gradients_match_an_independent_computation(layout, geometry):
  lhs, rhs, strides, pads, dilation = geometry
  rng = np.random.default_rng(0)
  x = rng.standard_normal(lhs).astype(np.float32)
  w = rng.standard_normal(rhs).astype(np.float32)
  conv = lambda x, w: onednn.conv(  # noqa: E731
      x, w, onednn.Geometry(strides, dilation, pads, onednn.LAYOUTS[layout]))
  y = jax.jit(conv)(x, w)
  cotangent = rng.standard_normal(y.shape).astype(np.float32)
  grad_x, grad_w = jax.jit(jax.grad(lambda x, w: jnp.vdot(conv(x, w), cotangent), (0, 1)))(x, w)
  want_y, want_x, want_w = _reference(x, w, strides, pads, dilation, cotangent)
  for got, want in ((y, want_y), (grad_x, want_x), (grad_w, want_w)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@needs_onednn
@pytest.mark.parametrize("layout", list(onednn.LAYOUTS))
def test_it_is_bitwise_repeatable_so_resumed_runs_stay_exact(layout):
  """Both cores share the filter gradient's reduction; its order must not vary by run."""
  geometry = onednn.Geometry((1, 1), (1, 1), ((1, 1), (1, 1)), onednn.LAYOUTS[layout])
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((8, 16, 16, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)) / 17, jnp.float32)
  step = jax.jit(jax.value_and_grad(
      lambda x, w: jnp.sum(onednn.conv(x, w, geometry) ** 2), (0, 1)))
  first, *others = [[np.asarray(a) for a in jax.tree.leaves(step(x, w))] for _ in range(3)]
  for other in others:
    for a, b in zip(first, other):
      np.testing.assert_array_equal(a, b)


@needs_onednn
def test_it_can_be_vmapped_over_an_ensemble():
  geometry = onednn.Geometry((1, 1), (1, 1), ((1, 1), (1, 1)), onednn.LAYOUTS["onednn_blocked"])
  rng = np.random.default_rng(1)
  xs = rng.standard_normal((3, 2, 5, 5, 4)).astype(np.float32)
  kernels = rng.standard_normal((3, 3, 3, 4, 6)).astype(np.float32)
  got = jax.jit(jax.vmap(lambda x, w: onednn.conv(x, w, geometry)))(xs, kernels)
  for member in range(3):
    want, _, _ = _reference(xs[member], kernels[member], (1, 1), ((1, 1), (1, 1)), (1, 1),
                            np.zeros((2, 5, 5, 6)))
    np.testing.assert_allclose(got[member], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
  monkeypatch.setenv(tuning.ENV_MODE, "measure")
  tuning.forget_tables()
  yield tmp_path
  tuning.forget_tables()


def _prefer(monkeypatch, winner: str, forward_winner: str | None = None):
  """Measurements in which `winner` is 3x faster than every other candidate; in those of a
  forward pass alone, `forward_winner` (if given)."""
  decide = tuning.decide

  def measured(name, candidates, static):
    fastest = forward_winner if forward_winner and name.startswith("forward ") else winner
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(tuning, "measure", lambda candidates, rounds=tuning.ROUNDS: {
          name: 1.0 if name == fastest else 3.0 for name in candidates})
      return decide(name, candidates, static)
  monkeypatch.setattr(tuning, "decide", measured)


def _model_and_data():
  model = cnnjax.create_model("resnet20", num_classes=3, depth=8, widths=(4, 4, 8))
  images = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  with lowering.use("xla"):
    variables = model.init(jax.random.key(0), images, train=False)
  return model, variables, images


@needs_onednn
def test_a_model_runs_oneDNN_where_it_measured_fastest_and_computes_the_same(table_dir,
                                                                            monkeypatch):
  _prefer(monkeypatch, "onednn_blocked")
  model, variables, images = _model_and_data()

  def loss(params, images):
    logits, _ = model.apply({**variables, "params": params}, images, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  step = jax.jit(jax.value_and_grad(loss))
  program = step.lower(variables["params"], images).as_text()
  # Every convolution of the model: the 3x3 layers and the strided 1x1 shortcut.
  assert program.count("cnnjax_onednn_conv_forward") >= 4
  assert "cnnjax_onednn_conv_filter_gradient" in program
  assert "stablehlo.convolution" not in program
  entries = json.loads(tuning.table_path().read_text())["entries"]
  conv_entries = [e for name, e in entries.items() if name.startswith("conv ")]
  assert conv_entries and all(e["choice"] == "onednn_blocked" for e in conv_entries)
  assert all(set(onednn.LAYOUTS) <= set(e["ms"]) for e in conv_entries)

  value, grads = step(variables["params"], images)
  with lowering.use("xla"):
    want_value, want_grads = jax.jit(jax.value_and_grad(loss))(variables["params"], images)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))

  # Opted out, the same table's choices fall back to the heuristics: no oneDNN call.
  monkeypatch.setenv(onednn.ENV_SWITCH, "0")
  assert "cnnjax_onednn" not in jax.jit(jax.value_and_grad(loss)).lower(
      variables["params"], images).as_text()


@needs_onednn
def test_inference_runs_the_forward_pass_measured_alone_and_training_its_own(table_dir,
                                                                           monkeypatch):
  """oneDNN fastest for the training step, XLA's convolution for the forward pass alone:
  the training program calls oneDNN and has no convolution, the inference program has
  XLA's convolutions, and both compute what the plain XLA model computes."""
  _prefer(monkeypatch, "onednn_blocked", forward_winner="xla")
  model, variables, images = _model_and_data()

  def loss(params, images):
    logits, _ = model.apply({**variables, "params": params}, images, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  infer = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
  train = jax.jit(jax.value_and_grad(loss))
  inference_program = infer.lower(variables, images).as_text()
  training_program = train.lower(variables["params"], images).as_text()
  # The 3x3 layers run XLA's convolution alone; a 1x1 layer has no "xla" forward candidate,
  # so its forward stays oneDNN's.
  assert inference_program.count("stablehlo.convolution") >= 3
  assert "cnnjax_onednn_conv_forward" in training_program
  assert "stablehlo.convolution" not in training_program
  entries = json.loads(tuning.table_path().read_text())["entries"]
  forward = {name: e["choice"] for name, e in entries.items() if name.startswith("forward ")}
  assert forward and {"xla", "onednn_blocked"} >= set(forward.values())

  with lowering.use("xla"):
    want_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    want_value, want_grads = jax.jit(jax.value_and_grad(loss))(variables["params"], images)
  np.testing.assert_allclose(infer(variables, images), want_logits, rtol=1e-4, atol=1e-5)
  value, grads = train(variables["params"], images)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * float(np.abs(want).max()))


_LOAD_IN_A_FRESH_PROCESS = """
import sys, jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, sys.argv[1])
from test_step_cache import _setup
from cnnjax.train import step_cache
_, train, state, batch = _setup()
compiled, loaded = step_cache.load_or_compile(train, (state, batch), description="onednn",
                                              cache_dir=sys.argv[2])
_, metrics = compiled(state, batch)
print(loaded, repr(float(jax.tree.leaves(metrics)[0])))
"""


@needs_onednn
def test_a_step_that_calls_oneDNN_loads_from_the_step_cache_in_a_fresh_process(
    table_dir, monkeypatch, tmp_path):
  """XLA resolves the FFI targets when it loads the program: a process that loads a cached
  step without tracing it must register them first."""
  from cnnjax.train import step_cache
  from test_step_cache import _copy, _setup

  _prefer(monkeypatch, "onednn")
  _, train, state, batch = _setup()
  train.lower(state, batch)  # measures (in fake) every convolution: oneDNN is chosen
  pinned = tmp_path / "pinned.json"
  shutil.copy(tuning.table_path(), pinned)  # so that both processes read the same choices
  monkeypatch.setenv(tuning.ENV_MODE, str(pinned))
  cache = tmp_path / "steps"
  compiled, loaded = step_cache.load_or_compile(train, (state, batch), description="onednn",
                                                cache_dir=cache)
  assert not loaded and "cnnjax_onednn_conv" in compiled.as_text()
  _, metrics = compiled(_copy(state), batch)

  env = {**os.environ, tuning.ENV_MODE: str(pinned)}
  out = subprocess.run([sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS,
                        os.path.dirname(__file__), str(cache)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  loaded_there, value_there = out.stdout.split()
  assert loaded_there == "True"
  assert float(value_there) == float(jax.tree.leaves(metrics)[0])
