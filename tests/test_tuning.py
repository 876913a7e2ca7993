"""The per-CPU tuning table: measured once, reused, pinned or off, and robust to bad files."""

from __future__ import annotations

import json
import warnings

import jax
import pytest

from cnnjax.models import lowering, tuning
from cnnjax.train import step_cache

NHWC = ("NHWC", "HWIO", "NHWC")
# A 3x3 convolution on a 4x4 map: 16 output positions, statically "im2col".
SHAPE = ((2, 4, 4, 8), (3, 3, 8, 16), (1, 1), "SAME", None, None, NHWC, 1, 1)


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
  monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path))
  monkeypatch.setenv(tuning.ENV_MODE, "measure")
  # XLA's own lowerings only; oneDNN's candidates are tests/test_onednn.py's.
  monkeypatch.setenv("CNNJAX_ONEDNN", "0")
  tuning.forget_tables()
  yield tmp_path
  tuning.forget_tables()


def _fake_times(monkeypatch, seconds: dict[str, float]):
  calls = []

  def measure(candidates, rounds=tuning.ROUNDS):
    calls.append(sorted(candidates))
    return {name: seconds[name] for name in candidates}
  monkeypatch.setattr(tuning, "measure", measure)
  return calls


def _entries(path):
  return json.loads(path.read_text())["entries"]


def test_a_real_measurement_times_every_lowering_and_is_stored(table_dir):
  assert lowering.choose(*SHAPE) in lowering.DENSE_METHODS
  path = tuning.table_path()
  assert path.parent == table_dir
  payload = json.loads(path.read_text())
  assert payload["cpu"] == tuning.cpu_description()
  (entry,) = [e for name, e in payload["entries"].items() if name.startswith("conv ")]
  assert set(entry["ms"]) == set(lowering.DENSE_METHODS)
  assert all(ms > 0 for ms in entry["ms"].values())
  assert entry["static"] == "im2col"


def test_a_measurement_repeats_short_runs_and_ignores_a_disturbed_sample(monkeypatch):
  """On a fake clock: a 1 ms run is repeated to fill each 20 ms sample, a 50 ms run is
  not; two of three samples slowed by an outside disturbance do not move either result."""
  clock = {"now": 0.0}
  monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock["now"])
  calls = {"short": 0, "long": 0}

  def candidate(name, seconds, disturbed_calls):
    def run():
      calls[name] += 1
      clock["now"] += seconds * (30 if calls[name] in disturbed_calls else 1)
    return lambda: run

  # After two warm-up calls each, the short run's 30th and 50th calls fall in its second
  # and third samples, the long run's 4th and 5th too.
  seconds = tuning.measure({"short": candidate("short", 1e-3, (30, 50)),
                            "long": candidate("long", 50e-3, (4, 5))}, rounds=3,
                           sample_seconds=20e-3)
  assert seconds == pytest.approx({"short": 1e-3, "long": 50e-3})
  assert calls == {"short": 2 + 3 * 20, "long": 2 + 3 * 1}


def test_the_fastest_wins_only_by_more_than_the_margin_and_is_then_fixed(table_dir, monkeypatch):
  calls = _fake_times(monkeypatch, {"xla": 0.90, "im2col": 1.0, "im2col_matmul": 2.0})
  assert lowering.choose(*SHAPE) == "xla"            # 10% faster than the heuristic's choice
  assert len(calls) == 1
  tuning.forget_tables()
  _fake_times(monkeypatch, {"xla": 5.0, "im2col": 1.0, "im2col_matmul": 1.0})
  assert lowering.choose(*SHAPE) == "xla"            # decided: read back, never re-measured
  other = ((2, 4, 4, 8), (3, 3, 8, 24), *SHAPE[2:])
  _fake_times(monkeypatch, {"xla": 0.97, "im2col": 1.0, "im2col_matmul": 1.5})
  assert lowering.choose(*other) == "im2col"         # 3% is noise: the heuristic stays
  assert len(_entries(tuning.table_path())) == 2


def test_off_and_pinned_tables_measure_nothing(table_dir, monkeypatch, tmp_path):
  _fake_times(monkeypatch, {"xla": 2.0, "im2col": 1.0, "im2col_matmul": 2.0})
  lowering.choose(*SHAPE)  # one measured entry, to copy into a pinned table
  (name,) = _entries(tuning.table_path())
  calls = _fake_times(monkeypatch, {"xla": 0.1, "im2col": 1.0, "im2col_matmul": 1.0})
  with tuning.use("off"):
    assert lowering.choose(*SHAPE) == "im2col"
  pinned = tmp_path / "pinned.json"
  pinned.write_text(json.dumps({"format": tuning.FORMAT, "entries": {
      name: {"choice": "im2col_matmul"}}}))
  before = pinned.read_bytes()
  with tuning.use(pinned):
    assert lowering.choose(*SHAPE) == "im2col_matmul"
    other = ((2, 4, 4, 8), (3, 3, 8, 24), *SHAPE[2:])
    assert lowering.choose(*other) == "im2col"       # not in the pinned table: the heuristic
  assert pinned.read_bytes() == before
  assert calls == []


def test_a_corrupt_table_is_measured_again_in_memory_and_left_alone(table_dir, monkeypatch):
  path = tuning.table_path()
  path.write_text("{not json")
  _fake_times(monkeypatch, {"xla": 0.5, "im2col": 1.0, "im2col_matmul": 2.0})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert lowering.choose(*SHAPE) == "xla"
    assert lowering.choose(*SHAPE) == "xla"          # kept in memory
  assert len(caught) == 1 and "unreadable" in str(caught[0].message)
  assert path.read_text() == "{not json"


def test_an_unwritable_table_keeps_its_measurements_in_memory(table_dir, monkeypatch):
  blocker = table_dir / "blocked"
  blocker.write_text("a user's file")
  monkeypatch.setenv(tuning.ENV_DIR, str(blocker / "tuning"))  # a file where a folder must be
  tuning.forget_tables()
  calls = _fake_times(monkeypatch, {"xla": 0.5, "im2col": 1.0, "im2col_matmul": 2.0})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert lowering.choose(*SHAPE) == "xla"
    assert lowering.choose(*SHAPE) == "xla"
  assert len(caught) == 1 and "cannot be written" in str(caught[0].message)
  assert len(calls) == 1
  assert blocker.read_text() == "a user's file"


@pytest.mark.parametrize("why", ["a GPU process", "one of several processes"])
def test_gpu_and_multi_process_runs_use_the_heuristics(table_dir, monkeypatch, why):
  calls = _fake_times(monkeypatch, {"xla": 0.1, "im2col": 1.0, "im2col_matmul": 1.0})
  if why == "a GPU process":
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  else:
    monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert lowering.choose(*SHAPE) == "im2col"
  assert calls == [] and not tuning.table_path().exists()


def test_bad_modes_name_the_valid_ones(monkeypatch):
  with pytest.raises(ValueError, match=r"unknown tuning mode 'fast'.*'measure', 'off'"):
    with tuning.use("fast"):
      pass
  monkeypatch.setenv(tuning.ENV_MODE, "1")
  with pytest.raises(ValueError, match=r"unknown tuning mode '1'"):
    tuning.current_mode()


def test_the_convolution_library_is_decided_per_machine(table_dir, monkeypatch):
  _fake_times(monkeypatch, {"xla": 2.0, "ynnpack": 1.0})
  assert lowering.convolution_library() == "ynnpack"
  assert lowering.compiler_options("cpu") == lowering.YNNPACK_CONVOLUTION_OPTIONS
  from cnnjax import xla_cpu

  assert xla_cpu._measured_ynnpack_faster()            # the process flag then stays off
  tuning.forget_tables()
  with tuning.use("off"):
    assert lowering.compiler_options("cpu") == lowering.CPU_COMPILER_OPTIONS


def test_a_model_traces_the_recorded_choices(table_dir, monkeypatch):
  import cnnjax

  model = cnnjax.create_model("resnet18", num_classes=3)
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jax.numpy.float32)
  with tuning.use("off"):
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)

  def convolutions(platform="cpu"):
    module = jax.export.export(jax.jit(lambda v, x: model.apply(v, x)),
                               platforms=[platform])(variables, images).mlir_module()
    return module.count("stablehlo.convolution")

  with tuning.use("off"):
    static = convolutions()
  _fake_times(monkeypatch, {"xla": 0.1, "im2col": 1.0, "im2col_matmul": 1.0})
  tuned = convolutions()              # every kxk layer measured XLA's convolution faster
  assert tuned > static
  assert all(e["choice"] == "xla" for e in _entries(tuning.table_path()).values())
  # The step cache keys on the tuning mode in force.
  with tuning.use("off"):
    off_key = step_cache.key_material((), "d", {})["tuning"]
  assert off_key != step_cache.key_material((), "d", {})["tuning"]


def test_a_measured_candidate_computes_its_forward_pass_too():
  """A convolution is linear: its gradient alone does not need the forward value, so XLA
  drops the forward and a candidate whose forward is slow would measure fast. The measured
  program returns the forward's value, checked here against an independent computation."""
  import functools

  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  from cnnjax.models import lowering

  lhs, rhs = (2, 4, 4, 3), (3, 3, 3, 5)
  conv = functools.partial(lowering._conv_by, "im2col", strides=(1, 1), dilation=(1, 1),
                           pads=((1, 1), (1, 1)), precision=None, dtype=None)
  value, (grad_x, grad_w) = lowering._compiled_gradient(conv, lhs, rhs, jnp.float32, {})()
  rng = np.random.default_rng(0)  # the same draws as the measurement's
  x = rng.standard_normal(lhs).astype(np.float32)
  w = (rng.standard_normal(rhs) / np.sqrt(np.prod(rhs[:3]))).astype(np.float32)
  cotangent = rng.standard_normal((2, 4, 4, 5)).astype(np.float32)
  forward = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert float(value) == pytest.approx(float(np.vdot(np.asarray(forward), cotangent)), rel=1e-4)
  assert grad_x.shape == lhs and grad_w.shape == rhs


def test_inference_takes_the_forward_pass_measured_alone_and_training_its_own(table_dir,
                                                                             monkeypatch):
  """Differentiated, an im2col convolution's patch matrix is built for the gradients anyway;
  alone, only the forward pass runs. Each is decided by its own measurement, and both
  compute the convolution."""
  import jax.numpy as jnp
  import numpy as np
  from jax import lax

  _fake_times(monkeypatch, {"xla": 2.0, "im2col": 1.0, "im2col_matmul": 0.5})
  assert lowering.choose(*SHAPE) == "im2col_matmul"  # a training step's forward: the patches
  calls = _fake_times(monkeypatch, {"xla": 0.5, "patch": 1.0})
  conv = lambda x, w: lowering.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  rng = np.random.default_rng(0)
  x = rng.standard_normal(SHAPE[0]).astype(np.float32)
  w = rng.standard_normal(SHAPE[1]).astype(np.float32)
  cotangent = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
  loss = lambda x, w: jnp.vdot(conv(x, w), cotangent)  # noqa: E731
  # With the forward's value, which the gradients alone do not need (XLA would drop it).
  grad = jax.value_and_grad(loss, (0, 1))
  inference_program = jax.jit(conv).lower(x, w).as_text()
  training_program = jax.jit(grad).lower(x, w).as_text()
  assert calls == [["patch", "xla"]]  # measured once, for both programs
  assert "stablehlo.convolution" in inference_program
  assert "stablehlo.convolution" not in training_program
  [entry] = [e for name, e in _entries(tuning.table_path()).items()
             if name.startswith("forward conv ")]
  assert entry["choice"] == "xla" and entry["static"] == "patch"

  reference = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME",  # noqa: E731
                                                    dimension_numbers=NHWC)
  np.testing.assert_allclose(jax.jit(conv)(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
  want = jax.value_and_grad(lambda x, w: jnp.vdot(reference(x, w), cotangent), (0, 1))(x, w)
  for got, expected in zip(jax.tree.leaves(jax.jit(grad)(x, w)), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
  with tuning.use("off"):  # without a measurement, both forwards are the heuristic's "im2col"
    assert lowering.choose(*SHAPE) == "im2col"
    assert "stablehlo.convolution" in jax.jit(conv).lower(x, w).as_text()
    assert "stablehlo.convolution" in jax.jit(grad).lower(x, w).as_text()
