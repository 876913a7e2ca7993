"""`python -m cnnjax.summary MODEL [--size N]`: a model's per-layer arithmetic.

`--zoo [PATTERN]` prints every matching model's parameters and FLOPs instead.
"""

from __future__ import annotations

import argparse
import sys
import types

from cnnjax.analysis import summary, zoo_table
from cnnjax.registry import create_model, list_models, model_info


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m cnnjax.summary", description=__doc__)
  parser.add_argument("model", nargs="?", help="a registered name (see --list)")
  parser.add_argument("--list", action="store_true", help="list the registered models")
  parser.add_argument("--size", type=int, default=None,
                      help="square input size (default: the model's own)")
  parser.add_argument("--num-classes", type=int, default=None)
  parser.add_argument("--zoo", nargs="?", const="*", default=None, metavar="PATTERN",
                      help="table of every model matching PATTERN (default: all)")
  args = parser.parse_args(argv)
  if args.zoo is not None:
    table = zoo_table(args.zoo)
    if table.count("\n") == 0:
      print(f"error: no model matches {args.zoo!r}", file=sys.stderr)
      return 2
    print(table)
    return 0
  if args.list or not args.model:
    print("\n".join(list_models()))
    return 0
  try:
    info = model_info(args.model)
    model = create_model(args.model, num_classes=args.num_classes)
    size = args.size or getattr(model, "input_size", None) or info.input_size
    print(summary(model, (size, size, info.channels)))
  except ValueError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  return 0


class _CallableModule(types.ModuleType):
  """Importing this module rebinds `cnnjax.summary` from the function to the module
  (Python sets a package attribute for each imported submodule); calling it must
  still give the table, so the module forwards calls to the function."""

  def __call__(self, *args, **kwargs):
    return summary(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  sys.exit(main())
