"""`train`: one training run, reported as one row."""

from __future__ import annotations

from cnnjax.experiments import common
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import DONE


@register("train")
def run(config, workdir, trial, command) -> dict:
  """Runs the experiment: one training run of `config.train` (no sweep).

  `config` is the experiment's ConfigDict, `workdir` its directory, `trial` a trial index
  to run alone (None: all, then the report), `command` the command line recorded in the
  report. Returns the summary written to `results.json`."""
  from cnnjax.train import train_and_evaluate  # noqa: PLC0415

  if trial is not None:
    raise ValueError(f"experiment {config.name!r} is a single run; it has no trials to select")
  num_classes = common.num_classes(config.train)
  measured = common.measurer(num_classes)(config.train)
  result = train_and_evaluate(config.train, workdir)
  row = {"name": config.name, **measured, "accuracy": result["top1"],
         "top5": result["top5"], "eval_examples": result["count"],
         "train_accuracy": result["train_accuracy"], "steps": result["step"],
         "train_seconds": result["train_seconds"], "images_per_second":
         result["images_per_second"], "status": DONE}
  columns = list(row)
  return common.finish(workdir, f"{config.name}: {config.description}", [row], columns, [], command)
