"""The glibc allocator settings: who starts with them, and that with them XLA:CPU stops faulting.

The claim behind `cnnjax.host_allocator` is a count, not a timing: without the
settings every call of a compiled computation maps its large buffers afresh
and faults in each of their pages; with them the pages are reused.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from cnnjax import host_allocator, xla_cpu
from cnnjax.experiments import launch
from tests.conftest import REPO, without_allocator_settings

pytestmark = pytest.mark.skipif(not host_allocator.supported(), reason="Linux with glibc only")

PAGE = 4096
BUFFER_BYTES = 2048 * 8192 * 4  # the output of each call below: 64 MiB, above any mmap threshold
CALLS = 20

FAULTS = textwrap.dedent("""
    import resource
    import jax, jax.numpy as jnp
    from cnnjax import host_allocator
    x = jnp.ones((2048, 8192), jnp.float32)
    double = jax.jit(lambda x: x * 2.0).lower(x).compile()
    # With the settings the heap grows over the first calls (8 alone, more on a busy machine,
    # where buffers are freed later), then stays.
    for _ in range(40):
      jax.block_until_ready(double(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(CALLS):
      jax.block_until_ready(double(x))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(host_allocator.state())
    print(after - before)
""").replace("CALLS", str(CALLS))


def _clean_env(**extra) -> dict:
  return {**without_allocator_settings(os.environ), **extra}


def _python(code: str, env: dict) -> list[str]:
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()


def test_with_the_settings_a_compiled_call_reuses_its_buffers_instead_of_faulting_them_in():
  without_state, without = _python(FAULTS, _clean_env())
  with_state, with_settings = _python(FAULTS, _clean_env(**host_allocator.SETTINGS))
  assert without_state.startswith("inactive") and with_state == "active"
  pages = BUFFER_BYTES / PAGE
  # Without: the 64 MiB output is faulted in on every call. With: a few calls may still
  # grow the heap (a late free on a busy machine); at least 16 of the 20 fault nothing.
  assert int(without) >= 0.9 * CALLS * pages
  assert int(with_settings) <= 4 * pages


REEXEC = ("from cnnjax import host_allocator as h\n"
          "h.reexec()\n"
          "print(h.state())\n"
          "print(h.started_with())")


def test_reexec_starts_the_command_again_once_with_the_settings():
  state, started = _python(REEXEC, _clean_env())
  assert state == "active" and started == repr(host_allocator.SETTINGS)


def test_reexec_leaves_an_opt_out_and_the_users_own_settings_alone():
  state, started = _python(REEXEC, _clean_env(CNNJAX_HOST_ALLOCATOR="0"))
  assert state == "opted out (CNNJAX_HOST_ALLOCATOR=0)" and started == "{}"
  state, started = _python(REEXEC, _clean_env(MALLOC_ARENA_MAX="4"))
  assert state == "the user's own settings stand (MALLOC_ARENA_MAX=4)"
  assert started == "{'MALLOC_ARENA_MAX': '4'}"


def test_children_get_the_settings_unless_opted_out_or_set_by_the_user():
  assert host_allocator.child_settings({}) == host_allocator.SETTINGS
  assert host_allocator.child_settings({"CNNJAX_HOST_ALLOCATOR": "off"}) == {}
  assert host_allocator.child_settings({"MALLOC_MMAP_MAX_": "8"}) == {"MALLOC_MMAP_MAX_": "8"}


def test_with_an_accelerator_plugin_the_settings_need_asking_for(monkeypatch):
  monkeypatch.setattr(xla_cpu, "accelerator_plugins", lambda: ["xla_cuda13"])
  assert host_allocator.child_settings({}) == {}
  assert host_allocator.child_settings({"CNNJAX_HOST_ALLOCATOR": "1"}) == host_allocator.SETTINGS
  assert host_allocator.child_settings({"CNNJAX_HOST_ALLOCATOR": "0"}) == {}
  monkeypatch.delenv(host_allocator.ENV_OPT_OUT, raising=False)
  monkeypatch.setattr(host_allocator, "active", lambda: False)
  assert host_allocator.state() == (
      "not applied: accelerator plugins installed (xla_cuda13); the settings were measured for "
      "XLA:CPU only (CNNJAX_HOST_ALLOCATOR=1 applies them)")
  monkeypatch.setattr(xla_cpu, "accelerator_plugins", lambda: [])
  assert host_allocator.child_settings({}) == host_allocator.SETTINGS


def test_ray_trial_workers_start_with_the_settings(monkeypatch):
  for name in host_allocator.SETTINGS:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.delenv(host_allocator.ENV_OPT_OUT, raising=False)
  launcher = launch.RayLauncher.__new__(launch.RayLauncher)
  launcher.resources = {"CPU": 1.0}
  assert host_allocator.SETTINGS.items() <= launcher._worker_env().items()
  monkeypatch.setenv(host_allocator.ENV_OPT_OUT, "0")
  assert not set(host_allocator.SETTINGS) & set(launcher._worker_env())


def test_a_bad_opt_out_value_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"CNNJAX_HOST_ALLOCATOR='maybe' is neither on nor off: "
                                       r"set it to 0 .* or 1"):
    host_allocator.child_settings({"CNNJAX_HOST_ALLOCATOR": "maybe"})
  # Both entry points that start again with the settings: one line, no traceback.
  for command in (["experiments.run", "--list"], ["benchmarks.train_step", "--help"]):
    out = subprocess.run([sys.executable, "-m", *command], cwd=REPO,
                         env=_clean_env(CNNJAX_HOST_ALLOCATOR="maybe"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and out.stdout == "", command
    assert out.stderr.strip().splitlines() == [
        "error: CNNJAX_HOST_ALLOCATOR='maybe' is neither on nor off: set it to 0 to start "
        "without the allocator settings, or 1 to use them (unset: used unless a JAX "
        "accelerator plugin is installed)"], command
