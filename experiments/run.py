"""`python -m experiments.run`: the researcher's front door (see cnnjax.experiments.cli)."""

import sys

from cnnjax.experiments.cli import main

if __name__ == "__main__":
  sys.exit(main())
