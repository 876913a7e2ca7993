"""The process-wide XLA:CPU setting of `cnnjax.xla_cpu`: what it changes, and what not.

Each case runs in a fresh interpreter, since XLA reads `XLA_FLAGS` once per process; only
the parsing of the opt-out runs here, with a fresh process's conditions patched in.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

_PROGRAMS = """
import json, os, re, sys, warnings
import jax, jax.numpy as jnp
from jax import lax
order = sys.argv[1]
if order == "compute first":
  jax.block_until_ready(jnp.ones(2) + 1)
with warnings.catch_warnings(record=True) as caught:
  warnings.simplefilter("always")
  import cnnjax
  from cnnjax import xla_cpu
if order == "restore":
  xla_cpu.restore()

def ynn_convolutions(hlo):
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"^%(\\S+) .*?\\{\\n(.*?)^\\}", hlo, re.M | re.S)}
  return sum("convolution(" in bodies.get(callee, "")
             for line in re.findall(r"fusion\\(.*__ynn_fusion.*", hlo)
             for callee in re.findall(r"calls=%(\\S+?),", line))

x, w = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
conv = jax.jit(lambda x, w: lax.conv_general_dilated(jnp.maximum(x, 0), w, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
a, b = jnp.ones((64, 128)), jnp.ones((128, 256))
mlp = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.tanh(jnp.maximum(a @ b, 0.1)) ** 2) + jnp.sum(a * a)))
# A model's training gradient jitted as a user would, and as cnnjax's steps compile it
# (widths above 16: YNNPACK leaves narrower convolutions to XLA anyway; depth 8, one block
# per stage: this program is compiled four times in these tests).
same = None
if order == "import first":
  model = cnnjax.create_model("resnet20", num_classes=3, widths=(24, 24, 24), depth=8)
  images = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  def loss(params, batch_stats, images):
    out, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out)
  user = jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"], images)
  from cnnjax.models import lowering
  same = user.compile().as_text() == user.compile(
      compiler_options=lowering.compiler_options("cpu")).as_text()
print(json.dumps({
    "state": xla_cpu.state(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "warnings": [str(w.message) for w in caught],
    "conv_in_ynn": ynn_convolutions(conv.lower(x, w).compile().as_text()),
    "mlp_hlo": mlp.lower(a, b).compile().as_text(),
    "user_equals_cnnjax_step": same,
}))
"""


def _run(order="import first", **env):
  environment = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "CNNJAX_XLA_FLAGS")}
  # The allocator's heap size goes into XLA_FLAGS too (tests/test_host_allocator.py): off here.
  environment.update(CNNJAX_HOST_ALLOCATOR="0", **env)
  out = subprocess.run([sys.executable, "-c", _PROGRAMS, order], cwd=REPO, env=environment,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def applied():
  return _run()


@pytest.fixture(scope="module")
def opted_out():
  return _run(CNNJAX_XLA_FLAGS="0")


def test_import_keeps_convolutions_with_xla_and_a_plain_jit_compiles_as_cnnjax_steps(applied):
  assert applied["state"] == "applied"
  assert applied["xla_flags"].split() == [
      "--xla_cpu_experimental_ynn_fusion_type="
      "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"]
  assert applied["conv_in_ynn"] == 0
  assert applied["user_equals_cnnjax_step"]
  assert applied["warnings"] == []


def test_the_opt_out_leaves_xla_as_it_is(opted_out):
  assert opted_out["state"].startswith("opted out")
  assert opted_out["xla_flags"] == ""
  assert opted_out["conv_in_ynn"] == 1     # what XLA does by default: the setting is needed
  assert not opted_out["user_equals_cnnjax_step"]


def test_programs_without_convolutions_compile_exactly_as_without_the_setting(applied, opted_out):
  assert applied["mlp_hlo"] == opted_out["mlp_hlo"]
  assert "__ynn_fusion" in applied["mlp_hlo"]   # YNNPACK still runs the dots and reductions


def test_users_own_flags_stand_and_restore_reverses():
  mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  result = _run(XLA_FLAGS=mine)
  assert result["state"] == "XLA_FLAGS already sets it" and result["xla_flags"] == mine
  restored = _run("restore", XLA_FLAGS="--xla_cpu_enable_fast_math=false")
  assert restored["state"] == "restored"
  assert restored["xla_flags"] == "--xla_cpu_enable_fast_math=false"
  assert restored["conv_in_ynn"] == 1


def test_too_late_warns_with_the_fix_and_changes_nothing():
  result = _run("compute first")
  assert result["state"] == "JAX's backends had started"
  assert result["xla_flags"] == ""
  assert len(result["warnings"]) == 1
  assert "Import cnnjax before the first JAX computation" in result["warnings"][0]
  assert "CNNJAX_XLA_FLAGS=0" in result["warnings"][0]


@pytest.mark.parametrize("value, warned, state", [
    ("maybe", True, "applied"), ("OFF", False, "opted out"), ("yes", False, "applied")])
def test_an_opt_out_value_that_is_neither_on_nor_off_warns_and_counts_as_on(
    value, warned, state, monkeypatch):
  # In this process, with the conditions that `import cnnjax` meets in a fresh one.
  from cnnjax import xla_cpu

  monkeypatch.setitem(xla_cpu._state, "state", "not applied yet")
  monkeypatch.setattr(xla_cpu, "_backends_started", lambda: False)
  monkeypatch.setattr(xla_cpu, "accelerator_plugins", lambda: [])
  monkeypatch.setattr(xla_cpu, "_measured_ynnpack_faster", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("CNNJAX_XLA_FLAGS", value)
  with pytest.warns(UserWarning) if warned else contextlib.nullcontext() as caught:
    assert xla_cpu.apply().startswith(state)
  if warned:
    assert [str(w.message) for w in caught] == [
        f"CNNJAX_XLA_FLAGS='{value}' is neither on nor off, so cnnjax treats it as on; set it "
        "to 0 to leave XLA_FLAGS alone, or unset it."]
  assert (xla_cpu.FLAG in os.environ["XLA_FLAGS"]) == (state == "applied")
