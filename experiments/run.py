"""`python -m experiments.run`: the researcher's front door (see cnnjax.experiments.cli)."""

import sys

if __name__ == "__main__":
  try:  # `import cnnjax` applies its process-wide settings (cnnjax.host_allocator, xla_cpu)
    from cnnjax.experiments.cli import main
  except ValueError as error:  # a bad CNNJAX_HOST_ALLOCATOR
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  sys.exit(main())
