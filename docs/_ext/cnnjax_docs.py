"""Sphinx directives that write documentation from cnnjax itself, so that it cannot drift.

`cnnjax-config`: a table of every key of `cnnjax.train.default_config()`, its default and its
meaning (`cnnjax.train.config.describe`).
"""

from __future__ import annotations

from docutils import nodes
from docutils.parsers.rst import Directive


def _cell(text: str, literal: bool = False) -> nodes.entry:
  entry = nodes.entry()
  paragraph = nodes.paragraph()
  if literal:
    paragraph += nodes.literal(text=text)
  else:
    # `name` in the meanings reads as code; the rest as text.
    for index, part in enumerate(text.split("`")):
      if part:
        paragraph += nodes.literal(text=part) if index % 2 else nodes.Text(part)
  entry += paragraph
  return entry


class ConfigKeys(Directive):
  """Every config key, its default and its meaning, as one table."""

  has_content = False

  def run(self):
    from cnnjax.train import config as config_lib  # noqa: PLC0415

    rows = config_lib.describe()
    table = nodes.table()
    group = nodes.tgroup(cols=3)
    for width in (28, 18, 54):
      group += nodes.colspec(colwidth=width)
    head = nodes.thead()
    header = nodes.row()
    for title in ("key", "default", "meaning"):
      header += _cell(title)
    head += header
    group += head
    body = nodes.tbody()
    for key, default, meaning in rows:
      row = nodes.row()
      row += _cell(key, literal=True)
      row += _cell(repr(default), literal=True)
      row += _cell(meaning or "(undocumented)")
      body += row
    group += body
    table += group
    return [table]


def setup(app):
  app.add_directive("cnnjax-config", ConfigKeys)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
