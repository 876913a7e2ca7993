"""The documentation: the README's length, docstring examples, a reference entry per public name.

`make docs` builds the site with warnings as errors (broken references too);
these checks need no Sphinx, so `make test` runs them.
"""

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re

import jax
import jax.numpy as jnp
import pytest

import cnnjax
from tests.conftest import REPO

API_PAGES = REPO / "docs" / "reference" / "api"


def _modules_with_examples() -> list[str]:
  names = []
  for info in pkgutil.walk_packages(cnnjax.__path__, "cnnjax."):
    spec = importlib.util.find_spec(info.name)
    if spec and spec.origin and ">>> " in pathlib.Path(spec.origin).read_text():
      names.append(info.name)
  return names


def test_the_readme_fits_in_150_lines():
  assert len((REPO / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("module", _modules_with_examples())
def test_docstring_examples_run(module):
  result = doctest.testmod(importlib.import_module(module), report=True,
                           extraglobs={"cnnjax": cnnjax, "jax": jax, "jnp": jnp},
                           optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0, result


def test_every_config_key_is_documented_and_no_documentation_is_stale():
  from cnnjax.train import config as config_lib

  described = config_lib.describe()
  assert [key for key, _, meaning in described if not meaning] == []
  assert set(config_lib.KEY_DOCS) - {key for key, _, _ in described} == set()


def _documented(module_name: str) -> tuple[bool, set[str] | None]:
  """(whether an API page autodocs `module_name`, the names its `:members:` lists or None
  for all)."""
  pattern = re.compile(r"\.\. automodule:: " + re.escape(module_name) + r"\n((?:   :.*\n)*)")
  for page in API_PAGES.glob("*.md"):
    match = pattern.search(page.read_text())
    if match:
      members = re.search(r":members:(.*)", match.group(1))
      listed = members.group(1).strip() if members else ""
      return True, ({n.strip() for n in listed.split(",")} if listed else None)
  return False, None


def _public(module) -> list[str]:
  if hasattr(module, "__all__"):
    return list(module.__all__)
  return [name for name, value in vars(module).items()
          if not name.startswith("_") and (inspect.isfunction(value) or inspect.isclass(value))
          and getattr(value, "__module__", None) == module.__name__]


REQUIRED = ["cnnjax", "cnnjax.data", "cnnjax.train", "cnnjax.weights", "cnnjax.lease"] + [
    f"cnnjax.experiments.kinds.{m.name}"
    for m in pkgutil.iter_modules(importlib.import_module("cnnjax.experiments.kinds").__path__)]


@pytest.mark.parametrize("module_name", REQUIRED)
def test_every_public_name_has_a_reference_entry_with_a_docstring(module_name):
  module = importlib.import_module(module_name)
  paged, listed = _documented(module_name)
  assert paged, f"no page under docs/reference/api/ has `.. automodule:: {module_name}`"
  missing = [name for name in _public(module) if listed is not None and name not in listed]
  assert missing == [], f"{module_name}: not in its page's :members: list: {missing}"
  undocumented = [name for name in _public(module)
                  if not inspect.getdoc(getattr(module, name)) or
                  inspect.getdoc(getattr(module, name)) == inspect.getdoc(type(getattr(module, name)))]
  assert undocumented == [], f"{module_name}: public names without a docstring: {undocumented}"


def test_every_guide_and_page_is_in_the_navigation():
  index = (REPO / "docs" / "index.md").read_text()
  for guide in sorted((REPO / "docs" / "guides").glob("*.md")):
    assert f"guides/{guide.stem}" in index, guide.name
  api = (REPO / "docs" / "reference" / "api.md").read_text()
  for page in sorted(API_PAGES.glob("*.md")):
    assert f"api/{page.stem}" in api, page.name
