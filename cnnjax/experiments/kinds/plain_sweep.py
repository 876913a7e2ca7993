"""`sweep`: the trials a config lists, trained and tabulated."""

from __future__ import annotations

from cnnjax.experiments import common
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import run_sweep, summary_rows

SWEEP_COLUMNS = ["trial", "name", "status", "model", "resolution", "params", "flops", "accuracy",
                 "train_accuracy", "train_seconds", "error"]


@register("sweep")
def run(config, workdir, trial, command) -> dict:
  """Runs the experiment: the config's trials, trained and tabulated side by side.

  `config` is the experiment's ConfigDict, `workdir` its directory, `trial` a trial index
  to run alone (None: all, then the report), `command` the command line recorded in the
  report. Returns the summary written to `results.json`."""
  num_classes = common.num_classes(config.train)
  records = run_sweep(config.train, workdir, common.config_trials(config), trial, common.measurer(num_classes))
  rows = summary_rows(records, SWEEP_COLUMNS)
  return common.finish(workdir, f"{config.name}: {config.description}", rows, SWEEP_COLUMNS, [], command)
