"""`sweep`: the trials a config lists, trained and tabulated."""

from __future__ import annotations

from cnnjax.experiments import common
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import run_sweep, summary_rows

SWEEP_COLUMNS = ["trial", "name", "status", "model", "resolution", "params", "flops", "accuracy",
                 "train_accuracy", "train_seconds", "error"]


@register("sweep")
def run(config, workdir, trial, command) -> dict:
  num_classes = common.num_classes(config.train)
  records = run_sweep(config.train, workdir, common.config_trials(config), trial, common.measurer(num_classes))
  rows = summary_rows(records, SWEEP_COLUMNS)
  return common.finish(workdir, f"{config.name}: {config.description}", rows, SWEEP_COLUMNS, [], command)
