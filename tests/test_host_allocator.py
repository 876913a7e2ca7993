"""The glibc allocator settings `import cnnjax` applies: when, and that with them XLA:CPU stops faulting.

The claim behind `cnnjax.host_allocator` is a count, not a timing: without the
settings every call of a compiled computation maps its large buffers afresh
and faults in each of their pages; with them the pages are reused.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from cnnjax import host_allocator
from cnnjax.experiments import launch
from tests.conftest import REPO, without_allocator_settings

pytestmark = pytest.mark.skipif(not host_allocator.supported(), reason="Linux with glibc only")

PAGE = 4096
ROWS = 196608  # activations of ROWS x 32 float32: 24 MiB each
CALLS = 20
TEMPORARY_PAGES = 5 * ROWS * 32 * 4 / PAGE  # five activations' worth, 120 MiB (memory_analysis)

FAULTS = textwrap.dedent("""
    import resource
    import jax, jax.numpy as jnp
    EARLY_COMPUTATION
    import cnnjax
    from cnnjax import host_allocator

    def loss(w, x):
      for layer in w:
        x = jnp.tanh(x @ layer)
      return x.sum()

    # A training step in small: its gradient keeps every layer's activation, 120 MiB of
    # temporaries, which XLA allocates at once (in heaps of 30 MiB where cnnjax set the flag).
    x, w = jnp.ones((ROWS, 32), jnp.float32), jnp.full((4, 32, 32), 0.01, jnp.float32)
    compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
    # With the settings the heaps grow over the first calls (each thread that runs a call
    # keeps its own), then stay.
    for _ in range(30):
      jax.block_until_ready(compiled(w, x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(CALLS):
      jax.block_until_ready(compiled(w, x))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(host_allocator.state())
    print(after - before)
""").replace("CALLS", str(CALLS)).replace("ROWS", str(ROWS))


def _clean_env(**extra) -> dict:
  # An unmeasured machine (no tuning table): where this one measured no gain, they are off.
  return {**without_allocator_settings(os.environ), "CNNJAX_TUNING": "off", **extra}


def _python(code: str, env: dict, early: str = "") -> list[str]:
  out = subprocess.run([sys.executable, "-c", code.replace("EARLY_COMPUTATION", early)],
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()[-2:]


def test_importing_cnnjax_after_jax_stops_the_faults_and_opting_out_keeps_them():
  """A plain process: `import jax`, then `import cnnjax`, no MALLOC_* variable, no launcher."""
  with_state, with_settings = _python(FAULTS, _clean_env())
  off_state, off = _python(FAULTS, _clean_env(CNNJAX_HOST_ALLOCATOR="0"))
  assert with_state == "active" and off_state == "opted out (CNNJAX_HOST_ALLOCATOR=0)"
  # Opted out: the temporaries are faulted in on every call. With: a few calls may still grow
  # a heap (a late free, a thread's first call); at least 16 of the 20 fault nothing.
  assert int(off) >= 0.9 * CALLS * TEMPORARY_PAGES
  assert int(with_settings) <= 4 * TEMPORARY_PAGES


def test_the_heap_flag_is_what_keeps_a_large_temporary():
  """glibc's part alone (the same values, as the user's own MALLOC_* variables: cnnjax then
  sets nothing) does not keep the 120 MiB of temporaries: without XLA's heap size they are
  one allocation, larger than any thread's heap, mapped afresh on every call."""
  glibc_only = {f"MALLOC_{name[2:]}_": str(value)
                for name, (_, value) in host_allocator.SETTINGS.items()}
  state, faults = _python(FAULTS, _clean_env(**glibc_only))
  assert state.startswith("the user's own settings stand (MALLOC_MMAP_MAX_=0")
  assert int(faults) >= 0.9 * CALLS * TEMPORARY_PAGES


def test_too_late_is_said_and_the_users_own_settings_stand():
  """After a JAX computation XLA has read its flags: nothing is set, state() names the fix,
  and the faults stay. MALLOC_* values of the user's own are left alone."""
  late_state, late = _python(FAULTS, _clean_env(), early="jnp.ones(1).block_until_ready()")
  assert late_state == host_allocator.TOO_LATE
  assert "Import cnnjax before running any JAX computation" in late_state
  assert int(late) >= 0.9 * CALLS * TEMPORARY_PAGES
  code = "import cnnjax\nfrom cnnjax import host_allocator\nprint(host_allocator.state())\nprint(0)"
  state, _ = _python(code, _clean_env(MALLOC_ARENA_MAX="4"))
  assert state == "the user's own settings stand (MALLOC_ARENA_MAX=4)"


def test_the_rule_for_opt_out_own_values_plugins_and_too_late():
  decide = host_allocator.decide
  assert decide({}, [], False) == "apply"
  assert decide({"CNNJAX_HOST_ALLOCATOR": "off"}, [], False) == (
      "opted out (CNNJAX_HOST_ALLOCATOR=off)")
  assert decide({"MALLOC_MMAP_MAX_": "8"}, [], False) == (
      "the user's own settings stand (MALLOC_MMAP_MAX_=8)")
  assert decide({}, ["xla_cuda13"], False) == (
      "not applied: accelerator plugins installed (xla_cuda13); the settings were measured for "
      "XLA:CPU only (CNNJAX_HOST_ALLOCATOR=1 applies them)")
  assert decide({"CNNJAX_HOST_ALLOCATOR": "1"}, ["xla_cuda13"], False) == "apply"
  assert decide({}, [], True) == host_allocator.TOO_LATE
  assert decide({}, [], False, is_supported=False) == "not applicable (not Linux with glibc)"
  assert decide({}, [], False, measured="off").startswith(
      "not applied: this machine measured its steps no faster with them")
  assert decide({"CNNJAX_HOST_ALLOCATOR": "1"}, [], False, measured="off") == "apply"
  assert decide({}, [], False, measured="on") == "apply"


def test_the_measurement_records_this_machines_choice_and_a_new_one_replaces_it(
    tmp_path, monkeypatch):
  from cnnjax.models import tuning

  monkeypatch.setenv("CNNJAX_TUNING_DIR", str(tmp_path))
  monkeypatch.delenv("CNNJAX_TUNING", raising=False)
  monkeypatch.setattr(tuning, "_tables", {})
  timings = {"1": 0.20, "0": 0.25}  # with them, steps 20% faster
  monkeypatch.setattr(host_allocator, "probe", lambda env: {
      "step_s": timings[env["CNNJAX_HOST_ALLOCATOR"]], "first_step_s": 10.0,
      "faults_per_step": 0})
  entry = host_allocator.measure(rounds=1)
  assert entry["choice"] == "on" and entry["step_on_over_off"] == pytest.approx(0.8)
  assert host_allocator.measured_choice() == "on"
  timings["1"] = 0.25  # no gain: measured again, the choice is replaced
  monkeypatch.setattr(tuning, "_tables", {})
  assert host_allocator.measure(rounds=1)["choice"] == "off"
  monkeypatch.setattr(tuning, "_tables", {})
  assert host_allocator.measured_choice() == "off"
  # A choice measured with other settings (one arena, before) is no choice for these.
  table = tuning._table(tuning.current_mode())
  table.record(host_allocator.TUNING_ENTRY, {"choice": "off", "settings": "one arena"},
               replace=True)
  assert tuning.lookup(host_allocator.TUNING_ENTRY) == "off"
  assert host_allocator.measured_choice() is None


def test_a_refused_mallopt_is_one_warning_naming_it(monkeypatch):
  monkeypatch.setitem(host_allocator._state, "state", "not applied yet")
  monkeypatch.setattr(host_allocator, "decide", lambda *args: "apply")
  monkeypatch.setattr(host_allocator, "_mallopt",
                      lambda: lambda parameter, value: 0 if parameter == -2 else 1)
  monkeypatch.setenv("XLA_FLAGS", f"--{host_allocator.HEAP_OPTION}=1")  # the user's value
  with pytest.warns(UserWarning, match=r"mallopt refused M_TOP_PAD;") as caught:
    assert host_allocator.apply() == "partly applied: mallopt refused M_TOP_PAD"
  assert len(caught) == 1


def test_ray_trial_workers_carry_the_drivers_choices(monkeypatch):
  for name in list(os.environ):
    if name.startswith("MALLOC_"):
      monkeypatch.delenv(name)
  monkeypatch.delenv(host_allocator.ENV_OPT_OUT, raising=False)
  launcher = launch.RayLauncher.__new__(launch.RayLauncher)
  launcher.resources = {"CPU": 1.0}
  env = launcher._worker_env()
  assert host_allocator.ENV_OPT_OUT not in env and not host_allocator.users_own(env)
  monkeypatch.setenv(host_allocator.ENV_OPT_OUT, "0")
  monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
  env = launcher._worker_env()
  assert env[host_allocator.ENV_OPT_OUT] == "0" and env["MALLOC_ARENA_MAX"] == "2"


def test_a_bad_opt_out_value_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"CNNJAX_HOST_ALLOCATOR='maybe' is neither on nor off: "
                                       r"set it to 0 .* or 1"):
    host_allocator.decide({"CNNJAX_HOST_ALLOCATOR": "maybe"}, [], False)
  # The command line: one line, no traceback.
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--list"], cwd=REPO,
                       env=_clean_env(CNNJAX_HOST_ALLOCATOR="maybe"), capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [
      "error: CNNJAX_HOST_ALLOCATOR='maybe' is neither on nor off: set it to 0 to run "
      "without the allocator settings, or 1 to use them (unset: used unless a JAX "
      "accelerator plugin is installed)"]
