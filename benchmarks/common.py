"""What every benchmark records next to its numbers: the machine and the date."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time

RESULTS = pathlib.Path(__file__).parent / "results"


def machine() -> dict:
  import jax  # noqa: PLC0415

  cpu = platform.processor() or ""
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "devices": [str(d) for d in jax.devices()]}


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
