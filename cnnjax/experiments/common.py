"""What the experiment kinds share: the trials' class count and cost, and the report's frame."""

from __future__ import annotations

import functools
import math
import pathlib
import time
from collections.abc import Callable

import numpy as np

from cnnjax import analysis, registry
from cnnjax.experiments import reports
from cnnjax.experiments.sweep import Trial
from cnnjax.train.config import model_overrides
from cnnjax.train.logs import read_metrics


def num_classes(train_config) -> int:
  """The classes the trials train for (preparing an embedded dataset if needed)."""
  from cnnjax import data  # noqa: PLC0415

  info = data.prepare(train_config.data.dataset, train_config.data.data_dir,
                      progress=train_config.progress_bar, backend=train_config.data.backend)
  return train_config.data.num_classes or info.num_classes


def native_resolution(train_config) -> int | None:
  """The height of the dataset's stored images; None where their sizes vary."""
  from cnnjax import data  # noqa: PLC0415

  shape = data.info(train_config.data.dataset, train_config.data.data_dir, progress=False,
                    backend=train_config.data.backend).image_shape
  return shape[0] if shape else None


def model_for(config, num_classes: int):
  return registry.create_model(config.model, num_classes=num_classes, **model_overrides(config))


@functools.lru_cache(maxsize=512)
def _static_cost(model_name: str, overrides: tuple, num_classes: int, size: int,
                 channels: int) -> tuple[int, int]:
  model = registry.create_model(model_name, num_classes=num_classes, **dict(overrides))
  result = analysis.summary(model, (size, size, channels))
  return result.total_params, result.flops


def measurer(num_classes: int) -> Callable:
  """config -> {'params', 'flops'} of the model the config trains, at its input size."""
  def measure(config) -> dict:
    overrides = tuple(sorted(model_overrides(config).items()))
    info = registry.model_info(config.model)
    size = config.data.image_size or info.input_size
    params, flops = _static_cost(config.model, overrides, num_classes, size, info.channels)
    return {"model": config.model, "resolution": size, "params": params, "flops": flops}
  return measure


def finish(workdir: pathlib.Path, title: str, rows, columns, sections: list[str],
            command: str) -> dict:
  reports.write_tables(workdir, rows, columns)
  body = [f"# {title}", "", f"Command: `{command}`", "",
          f"Written {time.strftime('%Y-%m-%d %H:%M')}.", "", *sections, "",
          "## All trials", "", reports.markdown_table(rows, columns), ""]
  (workdir / "report.md").write_text("\n".join(body))
  return {"rows": rows, "report": workdir / "report.md"}


def fmt_pct(value) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


def fmt_spread(values) -> str:
  """"75.6% ± 1.6%": the mean and standard deviation of `values` over seeds."""
  mean, std = spread(values)
  return fmt_pct(mean) if std is None else f"{fmt_pct(mean)} ± {fmt_pct(std)}"




def config_trials(config) -> list[Trial]:
  """The trials a sweep config lists: `config.trials`, each {name, overrides[, info]}."""
  return [Trial(t["name"], dict(t["overrides"]), dict(t.get("info", {}))) for t in config.trials]


# -- seeds and convergence ---------------------------------------------------------------------


def with_seeds(trials: list[Trial], seeds) -> list[Trial]:
  """Every trial once per seed: `<name>-s<seed>`, the seed in its overrides and info."""
  seeds = tuple(seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.seeds must be distinct seeds, at least one, got {seeds}")
  return [Trial(f"{t.name}-s{seed}", {**t.overrides, "seed": seed},
                {**t.info, "point": t.name, "seed": seed})
          for t in trials for seed in seeds]


def train_curve(directory: pathlib.Path) -> dict[str, list[float]]:
  """A trial's logged training windows: step, loss (without weight decay) and error."""
  path = directory / "metrics.jsonl"
  records = [r for r in read_metrics(path) if r["split"] == "train"] if path.exists() else []
  return {"step": [r["step"] for r in records], "loss": [r["data_loss"] for r in records],
          "error": [1.0 - r["accuracy"] for r in records]}


# A run has plateaued when its training loss changed by less than this over its last 20%.
PLATEAU_CHANGE = 0.02
PLATEAU_FRACTION = 0.2


def plateau_change(steps, losses, fraction: float = PLATEAU_FRACTION) -> float | None:
  """Relative change of the training loss over the last `fraction` of the run.

  The loss at the start of that stretch and at its end are each the mean of
  the logged windows in a tenth of the run around them, so batch noise does not
  read as progress. None when too few windows were logged to tell.
  """
  if len(steps) < 10:
    return None
  steps, losses = np.asarray(steps, float), np.asarray(losses, float)
  total = steps[-1]
  width = 0.1 * total

  def around(at):
    window = losses[np.abs(steps - at) <= width / 2]
    return float(window.mean()) if window.size else None

  start, end = around(total * (1 - fraction)), around(total - width / 2)
  if start is None or end is None or end <= 0:
    return None
  return (start - end) / end


def spread(values) -> tuple[float | None, float | None]:
  """Mean and sample standard deviation (None for fewer than one / two values)."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  mean = float(np.mean(values))
  return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def compare(a: list[float], b: list[float]) -> str:
  """"higher", "lower" or "tie": a against b, decided only where the gap exceeds both spreads."""
  (mean_a, std_a), (mean_b, std_b) = spread(a), spread(b)
  if mean_a is None or mean_b is None or std_a is None or std_b is None:
    return "tie"
  gap = mean_a - mean_b
  if abs(gap) > std_a and abs(gap) > std_b:
    return "higher" if gap > 0 else "lower"
  return "tie"


def tail_mean(values, tail: int) -> float:
  """What a run ends with: the mean of its last `tail` logged windows."""
  return sum(values[-tail:]) / len(values[-tail:])


# A trial has left chance when its final training loss is below this share of ln(classes),
# the loss of a uniform guess. One that has not also reads as "plateaued", but its flat loss
# is a failure to start, not convergence.
CHANCE_FRACTION = 0.9


def annotate_convergence(row: dict, curve: dict, tail: int, num_classes: int) -> None:
  """Adds a finished trial's final training error and loss, its plateau check and whether
  it left chance (`CHANCE_FRACTION`) to `row`."""
  finished = row["status"] == "done" and bool(curve["loss"])
  row["final_train_error"] = tail_mean(curve["error"], tail) if finished else None
  row["final_train_loss"] = tail_mean(curve["loss"], tail) if finished else None
  change = plateau_change(curve["step"], curve["loss"]) if finished else None
  row["loss_change_last_20pct"] = change
  row["plateaued"] = None if change is None else abs(change) < PLATEAU_CHANGE
  row["left_chance"] = (None if not finished
                        else row["final_train_loss"] < CHANCE_FRACTION * math.log(num_classes))


def plateau_sentence(rows: list[dict]) -> str:
  """Which trials were still improving when their budget ended, or that none was; and which
  never left chance. Names the smaller group, so that a long sweep's sentence stays readable."""
  stalled = [r["name"] for r in rows if r["plateaued"] is False]
  flat = [r["name"] for r in rows if r["plateaued"]]
  rule = (f"training loss changed by {100 * PLATEAU_CHANGE:g}% or more over the last 20% of "
          "the run")
  finished = len(stalled) + len(flat)
  if stalled and not flat:
    sentence = (f"All {finished} finished trials were still improving when their budget "
                f"ended ({rule}).")
  elif stalled and len(stalled) <= len(flat):
    sentence = (f"Still improving when their budget ended ({rule}): {', '.join(stalled)} "
                f"({len(stalled)} of {finished} finished trials).")
  elif stalled:
    sentence = (f"{len(stalled)} of {finished} finished trials were still improving when their "
                f"budget ended ({rule}); only these had plateaued: {', '.join(flat)}.")
  elif flat:
    sentence = (f"Every finished trial's training loss had plateaued (under "
                f"{100 * PLATEAU_CHANGE:g}% change over the last 20% of the run).")
  else:
    sentence = ""
  never = [r["name"] for r in rows if r.get("left_chance") is False]
  if never:
    sentence += (f" Never left chance (final training loss above {100 * CHANCE_FRACTION:g}% of "
                 f"a uniform guess's): {', '.join(never)}; a flat loss there is a failure to "
                 "start, not convergence.")
  return sentence.strip()
