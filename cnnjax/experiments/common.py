"""What the experiment kinds share: the trials' class count and cost, and the report's frame."""

from __future__ import annotations

import functools
import pathlib
import time
from collections.abc import Callable

from cnnjax import analysis, registry
from cnnjax.experiments import reports
from cnnjax.experiments.sweep import Trial
from cnnjax.train.config import model_overrides


def num_classes(train_config) -> int:
  """The classes the trials train for (preparing an embedded dataset if needed)."""
  from cnnjax import data  # noqa: PLC0415

  info = data.prepare(train_config.data.dataset, train_config.data.data_dir,
                      progress=train_config.progress_bar, backend=train_config.data.backend)
  return train_config.data.num_classes or info.num_classes


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




def config_trials(config) -> list[Trial]:
  """The trials a sweep config lists: `config.trials`, each {name, overrides[, info]}."""
  return [Trial(t["name"], dict(t["overrides"]), dict(t.get("info", {}))) for t in config.trials]
