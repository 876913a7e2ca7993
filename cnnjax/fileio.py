"""Writing a file so that no reader, and no crash, ever leaves half of it."""

from __future__ import annotations

import os
import pathlib
import tempfile


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to a temporary file beside `path`, then renames it over `path`.

  The temporary name is unique, so concurrent writers of the same path never mix
  their bytes: the last rename wins whole. A failed write removes its temporary.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".partial")
  try:
    with os.fdopen(fd, "wb") as file:
      file.write(data.encode() if isinstance(data, str) else data)
    os.replace(temporary, path)
  except BaseException:
    pathlib.Path(temporary).unlink(missing_ok=True)
    raise


def human_bytes(count: float) -> str:
  """`count` bytes as people read sizes.

  >>> human_bytes(275_904), human_bytes(3 * 2**30)
  ('269.4 KiB', '3.0 GiB')
  """
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(count) < 1024 or unit == "GiB":
      return f"{count:.0f} B" if unit == "B" else f"{count:.1f} {unit}"
    count /= 1024
  raise AssertionError("unreachable")
