"""Result files of an experiment: CSV, JSON, a Markdown report and PNG plots."""

from __future__ import annotations

import csv
import json
import math
import pathlib
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


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def _pyplot():
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def plot_lines(path: pathlib.Path, series: dict[str, tuple[Sequence[float], Sequence[float]]],
               xlabel: str, ylabel: str, title: str, logx: bool = False) -> None:
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=110)
  for label, (xs, ys) in series.items():
    pairs = sorted((x, y) for x, y in zip(xs, ys) if x is not None and y is not None)
    if pairs:
      axes.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", label=label)
  if logx:
    axes.set_xscale("log")
  axes.set_xlabel(xlabel)
  axes.set_ylabel(ylabel)
  axes.set_title(title)
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path)
  plt.close(figure)


def plot_bars(path: pathlib.Path, labels: Sequence[str], values: Sequence[float], ylabel: str,
              title: str) -> None:
  plt = _pyplot()
  figure, axes = plt.subplots(figsize=(max(6.4, 0.6 * len(labels)), 4.4), dpi=110)
  axes.bar(range(len(labels)), [v if v is not None else 0.0 for v in values])
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
