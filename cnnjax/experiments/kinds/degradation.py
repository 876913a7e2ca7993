"""`degradation`: plain against residual networks of two depths (He et al. 2016)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from cnnjax.experiments import common, reports
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import Trial, run_sweep, summary_rows, trial_dir
from cnnjax.train.logs import read_metrics

DEGRADATION_COLUMNS = ["trial", "name", "model", "params", "flops", "final_train_error",
                       "test_error", "accuracy", "train_seconds", "status", "error"]


def _train_curve(directory: pathlib.Path) -> tuple[list[int], list[float]]:
  path = directory / "metrics.jsonl"
  if not path.exists():
    return [], []
  records = [r for r in read_metrics(path) if r["split"] == "train"]
  return [r["step"] for r in records], [1.0 - r["accuracy"] for r in records]


@register("degradation")
def run(config, workdir, trial, command) -> dict:
  if config.curve_tail < 1:
    raise ValueError(f"curve_tail must be >= 1 logged window, got {config.curve_tail}")
  if not 0.0 <= config.tie_tolerance < 1.0:
    raise ValueError(f"tie_tolerance is a difference of error rates in [0, 1), got "
                     f"{config.tie_tolerance}")
  num_classes = common.num_classes(config.train)
  trials = [Trial(name, {"model": name}, {"depth": int(name[-2:]) if name[-2:].isdigit() else 0})
            for name in config.models]
  records = run_sweep(config.train, workdir, trials, trial, common.measurer(num_classes))
  curves = {t.name: _train_curve(trial_dir(workdir, i, t)) for i, t in enumerate(trials)}
  rows = summary_rows(records, DEGRADATION_COLUMNS + ["train_accuracy"])
  tail = config.curve_tail
  for row in rows:
    _, errors = curves[row["name"]]
    row["final_train_error"] = final_error(errors, tail) if errors else None
    row["test_error"] = None if row["accuracy"] is None else 1 - row["accuracy"]
  reports.plot_lines(workdir / "training_error.png",
                     curves,
                     "step", "training error (augmented batches)",
                     "Plain against residual networks")
  by_name = {r["name"]: r for r in rows}
  sections = ["![training error](training_error.png)", ""]

  def verdict(shallow, deep, family):
    a, b = by_name.get(shallow), by_name.get(deep)
    if not a or not b or a["final_train_error"] is None or b["final_train_error"] is None:
      return f"{family}: not all trials finished."
    return depth_verdict(family, shallow, deep, curves[shallow][1], curves[deep][1], tail,
                         config.tie_tolerance)

  plain = sorted((m for m in config.models if m.startswith("plain")), key=lambda m: int(m[5:]))
  residual = sorted((m for m in config.models if m.startswith("resnet")), key=lambda m: int(m[6:]))
  if len(plain) >= 2:
    sections.append("- " + verdict(plain[0], plain[-1], "Plain"))
  if len(residual) >= 2:
    sections.append("- " + verdict(residual[0], residual[-1], "Residual"))
  sections += ["", f"Training error is the mean over the last {tail} logged windows of "
               "training batches."]
  return common.finish(workdir, f"{config.name}: {config.description}", rows, DEGRADATION_COLUMNS,
                 sections, command)


def final_error(errors: Sequence[float], tail: int) -> float:
  """The training error a run ends with: the mean of its last `tail` logged windows."""
  return sum(errors[-tail:]) / len(errors[-tail:])


def depth_verdict(family: str, shallow: str, deep: str, shallow_errors: list[float],
                  deep_errors: list[float], tail: int, tolerance: float) -> str:
  """Whether the deeper network of a family trains worse, in one sentence.

  Judged on the final training error (`final_error`). Final errors within
  `tolerance` of each other are a tie, and the sentence then compares the mean
  training error over the whole run, which tells which network converged faster.
  """
  final_shallow, final_deep = final_error(shallow_errors, tail), final_error(deep_errors, tail)
  ends = (f"{family}: the deeper {deep} ends with training error {common.fmt_pct(final_deep)} against "
          f"{common.fmt_pct(final_shallow)} for {shallow}")
  if abs(final_deep - final_shallow) > tolerance:
    return f"{ends} — the deeper network trains {'worse' if final_deep > final_shallow else 'better'}."
  mean_shallow = sum(shallow_errors) / len(shallow_errors)
  mean_deep = sum(deep_errors) / len(deep_errors)
  pace = "faster" if mean_deep < mean_shallow else "slower"
  return (f"{ends}, within {common.fmt_pct(tolerance)}: no difference at the end of this budget. Over "
          f"the whole run the mean training error is {common.fmt_pct(mean_deep)} against "
          f"{common.fmt_pct(mean_shallow)}, so the deeper network converged {pace}.")
