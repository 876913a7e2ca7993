"""Result files of an experiment: CSV, JSON, a Markdown report, PNG plots, and their publication.

`publish` copies a finished workdir's results (not its checkpoints) into a
directory meant for version control, with the date, the command that produced
them and the machines its trials were trained on.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import platform
import shutil
import time
from collections.abc import Sequence
from typing import Any


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    if math.isnan(value):
      return ""
    return f"{value:.4g}"
  return str(value)


def write_tables(workdir: pathlib.Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "results.csv", "w", newline="", encoding="utf-8") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
      writer.writerow({c: row.get(c) for c in columns})
  (workdir / "results.json").write_text(json.dumps(list(rows), indent=1, default=str))


def read_results(workdir: str | os.PathLike) -> list[dict]:
  """The rows an experiment wrote (`results.json`), from a run's workdir or a published copy."""
  path = pathlib.Path(workdir) / "results.json"
  if not path.exists():
    raise FileNotFoundError(f"{workdir} has no results.json: run the experiment there first "
                            "(python -m experiments.run ... --workdir), or name a published one")
  return json.loads(path.read_text())


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def _pyplot():
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def _draw(axes, series: dict[str, tuple[Sequence[float], Sequence[float]]],
          errors: dict[str, Sequence[float | None]], colors: dict[str, str]) -> None:
  color = None
  for label, (xs, ys) in series.items():
    spreads = errors.get(label) or [None] * len(xs)
    points = sorted((x, y, e) for x, y, e in zip(xs, ys, spreads, strict=True)
                    if x is not None and y is not None)
    if points:
      style = {"marker": "o"} if len(points) <= 20 else {"linewidth": 1.0}
      if label.startswith("_") and color is not None:
        style["color"] = color
      elif label in colors:
        style["color"] = colors[label]
      x_values, y_values = [p[0] for p in points], [p[1] for p in points]
      (line,) = axes.plot(x_values, y_values, label=label, **style)
      color = line.get_color()
      if any(p[2] is not None for p in points):
        axes.errorbar(x_values, y_values, yerr=[p[2] or 0.0 for p in points], fmt="none",
                      ecolor=color, capsize=3)
  axes.grid(alpha=0.3)
  if axes.lines:  # every series may be empty while a sweep's trials are failing
    axes.legend(fontsize="small")


def _save(figure, path: pathlib.Path) -> None:
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path)


def plot_lines(path: pathlib.Path, series: dict[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str, ylabel: str, title: str, logx: bool = False,
               logy: bool = False,
               errors: dict[str, Sequence[float | None]] | None = None) -> Any:
  """One line per series; a label starting with "_" continues the previous series' colour
  without a legend entry (several seeds of one model). `errors[label]`, where given, are
  error bars (a standard deviation over seeds) at the series' points. Returns the figure,
  closed, for a test to inspect."""
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=110)
  _draw(axes, series, errors or {}, {})
  if logx:
    axes.set_xscale("log")
  if logy:
    axes.set_yscale("log")
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  _save(figure, path)
  plt.close(figure)
  return figure


def plot_panels(path: pathlib.Path,
                panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float]]]],
                xlabel: str, ylabel: str, title: str, logy: bool = False,
                colors: dict[str, str] | None = None) -> Any:
  """`plot_lines` for many series: one panel per key of `panels` (its title), sharing both
  axes, two panels a row. A label keeps the colour `colors` gives it in every panel.
  Returns the figure, closed."""
  plt = _pyplot()
  columns = 1 if len(panels) == 1 else 2
  rows = max(1, -(-len(panels) // columns))
  figure, grid = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), dpi=110,
                              sharex=True, sharey=True, squeeze=False)
  for axes, (name, series) in zip(grid.flat, panels.items()):
    _draw(axes, series, {}, colors or {})
    axes.set_title(name, fontsize="medium")
    if logy:
      axes.set_yscale("log")
  for index in range(len(panels), grid.size):  # an empty slot: the panel above shows the x axis
    grid.flat[index].set_visible(False)
    grid.flat[index - columns].xaxis.set_tick_params(labelbottom=True)
    grid.flat[index - columns].set_xlabel(xlabel)
  for axes in grid[-1]:
    axes.set_xlabel(xlabel)
  for axes in grid[:, 0]:
    axes.set_ylabel(ylabel)
  figure.suptitle(title)
  _save(figure, path)
  plt.close(figure)
  return figure


def plot_bars(path: pathlib.Path, labels: Sequence[str], values: Sequence[float], ylabel: str,
              title: str, errors: Sequence[float | None] | None = None) -> Any:
  """One bar per label; `errors`, where given, are error bars (a standard deviation over
  seeds). Returns the figure, closed, for a test to inspect."""
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(max(6.4, 0.6 * len(labels)), 4.4), dpi=110)
  heights = [v if v is not None else 0.0 for v in values]
  spreads = [e or 0.0 for e in errors] if errors is not None else None
  axes.bar(range(len(labels)), heights, yerr=spreads, capsize=3 if spreads else 0)
  axes.set_xticks(range(len(labels)))
  axes.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  low = min((v for v in values if v is not None), default=0.0)
  axes.set_ylim(max(0.0, low - 0.1), None)
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path)
  plt.close(figure)
  return figure


def machine() -> dict:
  """The CPU, core count, platform and library versions this process runs on."""
  import jax  # noqa: PLC0415

  cpu = platform.processor() or ""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
      for line in handle:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]}


PUBLISHED_FILES = ("report.md", "results.csv", "results.json")


class PublishError(ValueError):
  """Results that cannot be published: unfinished, or the destination already exists."""


def publish(workdir: pathlib.Path, destination: pathlib.Path, command: str) -> pathlib.Path:
  """Copies the report, tables and plots of `workdir` to `destination` with provenance.

  A sweep's finished trials travel too, as their records without checkpoints
  (`sweep.merge_finished`): their training curves stay readable, and
  `--merge_from <destination>` rebuilds the report without training.
  Never overwrites: an existing destination is an error naming it.
  """
  from cnnjax.experiments import sweep  # noqa: PLC0415 - sweep imports this module

  workdir, destination = pathlib.Path(workdir), pathlib.Path(destination)
  missing = [name for name in PUBLISHED_FILES if not (workdir / name).exists()]
  if missing:
    raise PublishError(f"{workdir} has no {', '.join(missing)}: run the experiment to the end "
                       "first (rerunning resumes it)")
  if destination.exists():
    raise PublishError(f"{destination} already exists; published results are never overwritten. "
                       "Remove it yourself or pass another --publish directory.")
  destination.mkdir(parents=True)
  for path in [*(workdir / n for n in PUBLISHED_FILES), *sorted(workdir.glob("*.png"))]:
    shutil.copy2(path, destination / path.name)
  if (workdir / "trials").is_dir():
    sweep.merge_finished(workdir, destination)
  info = machine()
  written = time.localtime((workdir / "report.md").stat().st_mtime)
  (destination / "PROVENANCE.md").write_text("\n".join([
      f"# Provenance of {destination.name}", "",
      f"- Published {time.strftime('%Y-%m-%d')} from `{workdir}`; results written "
      f"{time.strftime('%Y-%m-%d %H:%M', written)}.",
      f"- Command: `{command}`",
      f"- {'Published on' if (workdir / 'trials').is_dir() else 'Machine'}: {_describe(info)}.",
      *trained_on(workdir),
      ""]))
  return destination


def _describe(info: dict) -> str:
  return (f"{info['cpu']}, {info['cores']} cores, {info['platform']}; Python {info['python']}, "
          f"jax {info['jax']}; devices: {', '.join(info['devices'])}")


def trained_on(workdir: pathlib.Path) -> list[str]:
  """Provenance lines for a sweep's trials: when they started, and on which machines.

  Trials may have been trained elsewhere and merged (`sweep.merge_finished`),
  so these come from each trial's own `status.json`, never from this process.
  """
  statuses = [json.loads(p.read_text()) for p in sorted(workdir.glob("trials/*/status.json"))]
  if not statuses:
    return []
  started = sorted(s["started"][:10] for s in statuses if s.get("started"))
  machines: dict[str, int] = {}
  for status in statuses:
    # Records written before trials kept their machine say so rather than guess.
    described = _describe(status["machine"]) if status.get("machine") else "not recorded"
    machines[described] = machines.get(described, 0) + 1
  dates = "" if not started else f", started {started[0]}" + (
      f" to {started[-1]}" if started[-1] != started[0] else "")
  return [f"- Trials: {len(statuses)}{dates}; trained on:",
          *(f"  - {described} ({count} trial{'s' * (count != 1)})"
            for described, count in sorted(machines.items(), key=lambda item: -item[1]))]
