"""What every benchmark records next to its numbers: the machine and the date."""

from __future__ import annotations

import datetime
import json
import pathlib
import statistics
import time

RESULTS = pathlib.Path(__file__).parent / "results"


def machine() -> dict:
  from cnnjax.experiments import reports  # noqa: PLC0415

  return reports.machine()


def write(name: str, payload: dict) -> pathlib.Path:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}.json"
  record = {"date": datetime.date.today().isoformat(), "machine": machine(), **payload}
  path.write_text(json.dumps(record, indent=1))
  return path


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
