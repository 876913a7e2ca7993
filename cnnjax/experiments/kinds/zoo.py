"""`zoo`: one short training of every family on the same data: cost and accuracy."""

from __future__ import annotations

from cnnjax.experiments import common
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import run_sweep, summary_rows

ZOO_COLUMNS = ["trial", "name", "model", "resolution", "params", "flops", "accuracy",
               "images_per_second", "train_seconds", "status", "error"]


@register("zoo")
def run(config, workdir, trial, command) -> dict:
  """Runs the experiment: one short training per family at one resolution: parameters, FLOPs, accuracy, images/s.

  `config` is the experiment's ConfigDict, `workdir` its directory, `trial` a trial index
  to run alone (None: all, then the report), `command` the command line recorded in the
  report. Returns the summary written to `results.json`."""
  num_classes = common.num_classes(config.train)
  trials = common.config_trials(config)
  records = run_sweep(config.train, workdir, trials, trial, common.measurer(num_classes))
  rows = summary_rows(records, ZOO_COLUMNS)
  for row, record in zip(rows, records):
    row["images_per_second"] = (record.get("result") or {}).get("images_per_second")
  return common.finish(workdir, f"{config.name}: {config.description}", rows, ZOO_COLUMNS, [], command)
