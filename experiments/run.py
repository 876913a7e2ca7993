"""`python -m experiments.run`: the researcher's front door (see cnnjax.experiments.cli)."""

import sys

from cnnjax import host_allocator
from cnnjax.experiments.cli import main

if __name__ == "__main__":
  try:  # once, so that XLA:CPU's step buffers are reused (see cnnjax.host_allocator)
    host_allocator.reexec()
  except ValueError as error:  # a bad CNNJAX_HOST_ALLOCATOR
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  sys.exit(main())
