"""`python -m experiments.run`: the researcher's front door (see cnnjax.experiments.cli)."""

import sys

from cnnjax import host_allocator
from cnnjax.experiments.cli import main

if __name__ == "__main__":
  host_allocator.reexec()  # once, so that XLA:CPU's step buffers are reused (see its docstring)
  sys.exit(main())
