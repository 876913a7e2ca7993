"""The experiments, one module per kind, found by `config.kind`.

Each module of this package registers its `run(config, workdir, trial,
command) -> dict` with `@register("<kind>")`: it trains its trials through
`cnnjax.experiments.sweep`, judges them, and writes `results.csv`,
`results.json`, `report.md` and its plots into the workdir. A new experiment
is one new module here and one config in `experiments/configs/`.
"""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import pkgutil
from collections.abc import Callable

import ml_collections

from cnnjax import lease
from cnnjax.experiments import sweep

Runner = Callable[..., dict]
_KINDS: dict[str, Runner] = {}


def register(kind: str) -> Callable[[Runner], Runner]:
  """Registers `run(config, workdir, trial, command)` as the experiment `kind`."""

  def decorator(runner: Runner) -> Runner:
    if kind in _KINDS:
      raise ValueError(f"experiment kind {kind!r} is registered twice")
    _KINDS[kind] = runner
    return runner

  return decorator


def _import_all() -> None:
  for module in pkgutil.iter_modules(__path__):
    if not module.name.startswith("_"):
      importlib.import_module(f"{__name__}.{module.name}")


def names() -> list[str]:
  _import_all()
  return sorted(_KINDS)


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path, trial: int | None = None,
        command: str = "", launcher=None) -> dict:
  """Runs experiment `config` in `workdir`: all of it under the workdir's lease, or one trial.

  `launcher` runs the sweeps' trials (default: here, in order; see `launch`). A
  `--trial K` run holds only that trial's lease, so several can share the workdir.
  """
  _import_all()
  if config.kind not in _KINDS:
    raise ValueError(f"unknown experiment kind {config.kind!r}; one of {sorted(_KINDS)}")
  workdir = pathlib.Path(workdir)
  holding = lease.hold(workdir) if trial is None else contextlib.nullcontext()
  with holding, sweep.launching(launcher):
    return _KINDS[config.kind](config, workdir, trial, command)
