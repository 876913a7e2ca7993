"""Every notebook in notebooks/ runs top to bottom, and the committed ones carry their outputs.

A failing cell fails the test with the notebook's name, the cell's number and its first line.
"""

from __future__ import annotations

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks_and_they_keep_their_outputs():
  assert len(NOTEBOOKS) >= 3
  for path in NOTEBOOKS:
    book = nbformat.read(path, as_version=4)
    code = [c for c in book.cells if c.cell_type == "code"]
    assert code, path.name
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2, \
        f"{path.name} was committed without its outputs: execute it before committing"
    # A reader without a kernel sees the figures too: executed under MPLBACKEND=Agg, a
    # notebook keeps none.
    for index, cell in enumerate(code):
      if "plt.show()" in cell.source:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), \
            f"{path.name}, code cell {index}, was committed without its figure: execute it " \
            "with matplotlib's inline backend (MPLBACKEND unset)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: pathlib.Path, tmp_path):
  book = nbformat.read(path, as_version=4)
  client = NotebookClient(book, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  try:
    # TMPDIR: what a notebook writes to a temporary directory goes with the test's tmp_path.
    client.execute(env={**os.environ, "MPLBACKEND": "Agg", "TMPDIR": str(tmp_path)})
  except CellExecutionError as error:
    index, cell = next(((i, c) for i, c in enumerate(book.cells)
                        if c.cell_type == "code" and any(o.get("output_type") == "error"
                                                         for o in c.get("outputs", []))),
                       (None, None))
    first = cell.source.strip().splitlines()[0] if cell is not None else "?"
    pytest.fail(f"{path.name}, cell {index} ({first!r}) failed:\n{str(error)[-2000:]}")
