"""How steady the CPU tuning's choices are: fresh tables of one machine, compared pairwise.

    python -m benchmarks.tuning_steadiness [--model resnet18] [--sizes 64,128] [--tables 2]

Each table is measured afresh, in its own process, for the training and inference steps of
`benchmarks.train_step` (batch 16), by two estimators in alternation:
- "fastest": `tuning.measure` as it is (each candidate's fastest of 5 samples, a sample
  repeating the run to fill 20 ms);
- "median": the median of 5 single runs after one warm-up (measurement version 3), the peer.

For every pair of tables of one estimator: how many choices agree, and what each
disagreement costs, by each table's own times: the other table's choice over its own,
the worse of the two readings. A choice between near candidates may flip and costs
little; one that flips between candidates far apart is noise deciding. Also the seconds
each table took (tracing, compiling and measuring). Writes
benchmarks/results/tuning_steadiness_<model>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from benchmarks import common

ESTIMATORS = ("fastest", "median")


def _median_of_single_runs(candidates, rounds=5, sample_seconds=None):
  """Measurement version 3's estimator: the median of single runs, in alternation, after
  one warm-up each (`common.interleaved` also shuffles the order of each round)."""
  import jax

  with jax.ensure_compile_time_eval():
    runs = {name: prepare() for name, prepare in candidates.items()}
    return common.interleaved(runs, rounds, warmup=1)


def measure_table(estimator: str, model: str, sizes: list[int]) -> None:
  """In this process (with `CNNJAX_TUNING_DIR` set to an empty directory): trace the steps,
  which measures the table; print the seconds it took."""
  import time

  from benchmarks import train_step
  from cnnjax.models import tuning

  if estimator == "median":
    tuning.measure = _median_of_single_runs
  start = time.perf_counter()
  for size in sizes:
    train_step._jax_steps(model, size)
  print(json.dumps({"seconds": time.perf_counter() - start}))


def _entries(directory: pathlib.Path) -> dict:
  (path,) = directory.glob("*.json")
  return json.loads(path.read_text())["entries"]


def compare(first: dict, second: dict) -> dict:
  """Agreement of two tables' choices, and the cost of each disagreement."""
  names = sorted(set(first) & set(second))
  costs = []
  for name in names:
    a, b = first[name], second[name]
    if a["choice"] != b["choice"]:
      costs.append(max(a["ms"][b["choice"]] / a["ms"][a["choice"]],
                       b["ms"][a["choice"]] / b["ms"][b["choice"]]))
  return {"entries": len(names), "agree": len(names) - len(costs),
          "disagreement_costs": sorted(round(c, 3) for c in costs)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18")
  parser.add_argument("--sizes", default="64,128")
  parser.add_argument("--tables", type=int, default=2, help="fresh tables per estimator")
  parser.add_argument("--_measure", choices=ESTIMATORS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.tables < 2:
    parser.error(f"--tables {args.tables}: tables are compared in pairs; give 2 or more")
  sizes = [int(s) for s in args.sizes.split(",")]
  if args._measure:
    measure_table(args._measure, args.model, sizes)
    return

  from benchmarks import train_step

  peak = train_step.matmul_peak()
  print(f"matmul peak: jax {peak['jax_gflops']:.0f} GFLOP/s, torch {peak['torch_gflops']:.0f} "
        "GFLOP/s", flush=True)
  tables = {e: [] for e in ESTIMATORS}
  seconds = {e: [] for e in ESTIMATORS}
  root = pathlib.Path(tempfile.mkdtemp(prefix="tuning-steadiness-"))
  for index in range(args.tables):
    for estimator in ESTIMATORS:  # alternated, so a drift of the machine hits both
      directory = root / f"{estimator}-{index}"
      directory.mkdir()
      env = {**os.environ, "CNNJAX_TUNING_DIR": str(directory), "CNNJAX_TUNING": "measure"}
      done = subprocess.run(
          [sys.executable, "-m", "benchmarks.tuning_steadiness", "--model", args.model,
           "--sizes", args.sizes, "--_measure", estimator],
          env=env, check=True, capture_output=True, text=True)
      seconds[estimator].append(round(json.loads(done.stdout.splitlines()[-1])["seconds"], 1))
      tables[estimator].append(_entries(directory))
      print(f"{estimator} table {index}: {seconds[estimator][-1]} s", flush=True)

  pairs = {e: [compare(a, b) for a, b in itertools.combinations(tables[e], 2)]
           for e in ESTIMATORS}
  for estimator in ESTIMATORS:
    for pair in pairs[estimator]:
      costs = pair["disagreement_costs"]
      print(f"{estimator:8s} {pair['agree']} of {pair['entries']} choices agree; "
            f"disagreements cost {max(costs, default=1.0):.2f}x at most "
            f"({sum(c > 1.2 for c in costs)} over 1.2x)")
  path = common.write(f"tuning_steadiness_{args.model}", {
      "command": " ".join(sys.argv), "model": args.model, "sizes": sizes,
      "matmul_peak": peak, "seconds": seconds, "pairs": pairs})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
