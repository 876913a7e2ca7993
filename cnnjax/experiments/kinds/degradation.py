"""`degradation`: plain against residual networks of two depths (He et al. 2016), over seeds.

He et al.'s two claims: a deeper plain network trains worse than a shallower
one (degradation), and with identity shortcuts the deeper one trains better.
Every model trains once per seed in `config.seeds`; a trial's final training
error is the mean of its last `curve_tail` logged windows. A family's verdict
says "worse" or "better" only where the mean final errors differ by more than
both models' standard deviations over the seeds. Each trial's training loss
is checked for a plateau (under 2% relative change over the last 20% of the
run): the report says which trials were still improving when they stopped,
and which never left chance (a flat loss near ln(classes) is a failure to
start, and a verdict resting on one says so).
"""

from __future__ import annotations

from collections.abc import Sequence

from cnnjax.experiments import common, reports
from cnnjax.experiments.kinds import register
from cnnjax.experiments.sweep import Trial, run_sweep, summary_rows, trial_dir

TRIAL_COLUMNS = ["trial", "name", "model", "seed", "params", "flops", "final_train_error",
                 "final_train_loss", "loss_change_last_20pct", "plateaued", "left_chance",
                 "test_error", "accuracy", "train_seconds", "status", "error"]
MODEL_COLUMNS = ["model", "seeds", "train_error_mean", "train_error_std", "test_error_mean",
                 "test_error_std", "plateaued", "left_chance"]


def _depth(model: str) -> int:
  digits = "".join(c for c in model if c.isdigit())
  return int(digits) if digits else 0


def _check(config) -> None:
  if config.curve_tail < 1:
    raise ValueError(f"curve_tail must be >= 1 logged window, got {config.curve_tail}")
  if not config.models:
    raise ValueError("config.models is empty")
  common.with_seeds([], config.seeds)


@register("degradation")
def run(config, workdir, trial, command) -> dict:
  """Runs the experiment: plain and residual networks of two depths, several seeds each: training error and loss curves, plateaus, which deeper network trains worse or better beyond the seeds' spread.

  `config` is the experiment's ConfigDict, `workdir` its directory, `trial` a trial index
  to run alone (None: all, then the report), `command` the command line recorded in the
  report. Returns the summary written to `results.json`."""
  _check(config)
  num_classes = common.num_classes(config.train)
  models = [Trial(name, {"model": name}, {"model": name, "depth": _depth(name)})
            for name in config.models]
  trials = common.with_seeds(models, config.seeds)
  records = run_sweep(config.train, workdir, trials, trial, common.measurer(num_classes))
  curves = {t.name: common.train_curve(trial_dir(workdir, i, t)) for i, t in enumerate(trials)}
  rows = summary_rows(records, TRIAL_COLUMNS + ["point"])
  for row in rows:
    common.annotate_convergence(row, curves[row["name"]], config.curve_tail, num_classes)
    row["test_error"] = None if row["accuracy"] is None else 1 - row["accuracy"]

  per_model = model_table(rows, config.models)
  _plot(workdir, config.models, rows, curves)
  sections = ["![training error](training_error.png)", "", "![training loss](training_loss.png)",
              "", f"## Over {len(tuple(config.seeds))} seeds", "",
              reports.markdown_table(per_model, MODEL_COLUMNS), ""]
  for family, prefix in (("Plain", "plain"), ("Residual", "resnet")):
    members = sorted((m for m in config.models if m.startswith(prefix)), key=_depth)
    if len(members) >= 2:
      mine = [[r for r in rows if r["point"] == m] for m in (members[0], members[-1])]
      sections.append("- " + depth_verdict(
          family, members[0], members[-1], *([r["final_train_error"] for r in m] for m in mine),
          stuck=[r["name"] for m in mine for r in m if r["left_chance"] is False]))
  sections += ["", f"A trial's training error is the mean over its last {config.curve_tail} logged "
               "windows of training batches. " + common.plateau_sentence(rows)]
  return common.finish(workdir, f"{config.name}: {config.description}", rows, TRIAL_COLUMNS,
                       sections, command)


def model_table(rows: list[dict], models: Sequence[str]) -> list[dict]:
  """Mean and standard deviation over seeds of each model's final training and test error."""
  table = []
  for model in models:
    mine = [r for r in rows if r["point"] == model]
    train_mean, train_std = common.spread([r["final_train_error"] for r in mine])
    test_mean, test_std = common.spread([r["test_error"] for r in mine])
    flags = [r["plateaued"] for r in mine if r["plateaued"] is not None]
    started = [r["left_chance"] for r in mine if r.get("left_chance") is not None]
    table.append({"model": model, "seeds": sum(r["final_train_error"] is not None for r in mine),
                  "train_error_mean": train_mean, "train_error_std": train_std,
                  "test_error_mean": test_mean, "test_error_std": test_std,
                  "plateaued": f"{sum(flags)}/{len(flags)}",
                  "left_chance": f"{sum(started)}/{len(started)}"})
  return table


def depth_verdict(family: str, shallow: str, deep: str, shallow_finals: list,
                  deep_finals: list, stuck: Sequence[str] = ()) -> str:
  """Whether the deeper network of a family trains worse, judged against the seeds' spread.

  `stuck` names the two models' trials that never left chance: a gap they make
  says that those failed to start, not how well the deeper network trains.
  """
  (mean_s, std_s), (mean_d, std_d) = (common.spread(shallow_finals),
                                      common.spread(deep_finals))
  if mean_s is None or mean_d is None:
    return f"{family}: not all trials finished."
  if std_s is None or std_d is None:
    short = [name for name, std in ((shallow, std_s), (deep, std_d)) if std is None]
    return (f"{family}: {' and '.join(short)} finished one seed only; a verdict needs at "
            "least two per model.")

  def pct(mean, std):
    return f"{100 * mean:.2f}% ± {100 * std:.2f}%"

  ends = (f"{family}: the deeper {deep} ends with training error {pct(mean_d, std_d)} against "
          f"{pct(mean_s, std_s)} for {shallow}")
  outcome = common.compare(deep_finals, shallow_finals)
  if outcome == "tie":
    verdict = f"{ends}: no difference beyond the seeds' spread."
  else:
    verdict = f"{ends}: the deeper network trains {'worse' if outcome == 'higher' else 'better'}."
  if stuck:
    verdict += (f" Never left chance: {', '.join(stuck)}; where they make the gap, the verdict "
                "reports a failure to start, not how well the network trains.")
  return verdict


def _plot(workdir, models, rows, curves) -> None:
  series_error, series_loss = {}, {}
  for model in models:
    names = [r["name"] for r in rows if r["point"] == model and curves[r["name"]]["step"]]
    for index, name in enumerate(names):
      label = model if index == 0 else f"_{name}"  # one legend entry per model
      curve = curves[name]
      series_error[label] = (curve["step"], curve["error"])
      series_loss[label] = (curve["step"], curve["loss"])
  reports.plot_lines(workdir / "training_error.png", series_error, "step",
                     "training error (augmented batches)", "Plain against residual networks")
  reports.plot_lines(workdir / "training_loss.png", series_loss, "step", "training loss",
                     "Training loss of every seed", logy=True)
