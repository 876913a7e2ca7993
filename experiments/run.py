"""`python -m experiments.run`: the researcher's front door.

Training experiments arrive with the training engine; until then this prints
the model zoo with each model's measured parameters and FLOPs.
"""

from __future__ import annotations

import argparse
import sys

from cnnjax.analysis import zoo_table


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__)
  parser.add_argument("--models", default="*", help="shell pattern of model names (default: all)")
  args = parser.parse_args(argv)
  table = zoo_table(args.models)
  print(table)
  if table.count("\n") == 0:
    print(f"no model matches {args.models!r}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
