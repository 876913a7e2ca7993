"""A sweep run in order against the same sweep on a local Ray cluster: equal tables, wall time.

    python -m benchmarks.sweep_launchers [--config experiments/configs/efficientnet_scaling.py:smoke]
        [--num_cpus 2]

Runs the experiment twice in fresh workdirs, through the command line: with
`--launcher=local` and with `--launcher=ray` on a Ray instance started here with
`--num_cpus` CPUs (trials at `config.trial_resources`, one CPU each by default,
so `num_cpus` trials at once). Compares `results.csv` row for row, leaving out
the columns that time the machine, and reports both wall times. Writes
benchmarks/results/sweep_launchers.json.
"""

from __future__ import annotations

import argparse
import csv
import pathlib
import subprocess
import sys
import tempfile
import time

from benchmarks import common

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING_COLUMNS = {"train_seconds", "images_per_second"}


def _rows(workdir: pathlib.Path) -> list[dict]:
  with open(workdir / "results.csv", newline="") as handle:
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
            for row in csv.DictReader(handle)]


def _run(config: str, workdir: pathlib.Path, launcher: str, num_cpus: int) -> float:
  command = [sys.executable, "-c",
             "import sys, ray; from cnnjax.experiments import cli; "
             f"ray.init(num_cpus={num_cpus}, include_dashboard=False) if sys.argv[1] == 'ray' "
             "else None; sys.exit(cli.main(sys.argv[2:]))",
             launcher, f"--config={config}", f"--workdir={workdir}", f"--launcher={launcher}",
             "--cache_dir="]  # both compile from scratch: a fair wall time
  start = time.perf_counter()
  subprocess.run(command, cwd=REPO, check=True)
  return time.perf_counter() - start


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="experiments/configs/efficientnet_scaling.py:smoke")
  parser.add_argument("--num_cpus", type=int, default=2)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    seconds = {launcher: _run(args.config, tmp / launcher, launcher, args.num_cpus)
               for launcher in ("local", "ray")}
    local, ray_rows = _rows(tmp / "local"), _rows(tmp / "ray")
  differing = [(a, b) for a, b in zip(local, ray_rows) if a != b]
  record = {"command": "python -m benchmarks.sweep_launchers " + " ".join(argv or sys.argv[1:]),
            "config": args.config, "num_cpus": args.num_cpus, "trials": len(local),
            "rows_equal": len(local) == len(ray_rows) and not differing,
            "differing_rows": differing[:5], "local_seconds": round(seconds["local"], 1),
            "ray_seconds": round(seconds["ray"], 1)}
  path = common.write("sweep_launchers", record)
  print(record, f"\nwrote {path}")


if __name__ == "__main__":
  main()
