"""`python -m cnnjax.measure_allocator`: this machine's choice of the allocator settings.

Times a plain `jax.jit` step of MobileNet v2 at 128 px in fresh processes with and without
the settings `import cnnjax` applies (`cnnjax.host_allocator`), interleaved, and records in
this CPU's tuning table whether they pay here (the step at least 5% faster). Later imports
of cnnjax on this machine follow the record. About two minutes on 2 cores.

    python -m cnnjax.measure_allocator [--rounds 2]
"""

from __future__ import annotations

import argparse
import json

from cnnjax import host_allocator


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2, help="processes per variant")
  args = parser.parse_args(argv)
  print(json.dumps(host_allocator.measure(args.rounds), indent=1))


if __name__ == "__main__":
  main()
