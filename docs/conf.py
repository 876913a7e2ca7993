"""Sphinx configuration of cnnjax's documentation: `make docs` builds it with warnings as errors.

Markdown through myst; the committed notebooks rendered from their stored outputs (myst-nb,
never executed); the API reference from docstrings (autodoc); the config keys from
`cnnjax.train.config.describe` (the `cnnjax-config` directive in `_ext/cnnjax_docs.py`).
"""

import os
import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "_ext"))
# The docs describe cnnjax, they do not run it: no allocator or XLA flag changes at import.
os.environ.setdefault("CNNJAX_HOST_ALLOCATOR", "0")

project = "cnnjax"
author = "the cnnjax developers"
copyright = "2026, the cnnjax developers"  # noqa: A001

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "cnnjax_docs",
]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebooks are committed with their outputs
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "README.md"]
html_theme = "furo"
html_title = "cnnjax"
templates_path = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = False

# Broken references inside cnnjax fail the build; names from other projects have no
# inventory here (the build is offline), so they are not checked.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jnp|np|numpy|flax|nn|optax|orbax|ml_collections|grain|PIL|Image|tfds|"
               r"tensorflow_datasets|ray|torch|collections|typing|pathlib|os|abc|enum|"
               r"dataclasses|concurrent|threading|types|logging|builtins|array_record|"
               r"jax\._src|jaxlib|dynamic_scale_lib|ocp|Mesh|NamedSharding|PartitionSpec|P)(\..*)?"),
    (r"py:class", r"(Any|Callable|Sequence|Mapping|Iterator|Iterable|Path|ConfigDict|"
                  r"FrozenDict|Array|ndarray|PRNGKey|Module|GradientTransformation|OptState|"
                  r"Generator|Lease|TrainState|Sharding|Device|DType|Shape|dtype|"
                  r"Initializer|PyTree|DynamicScale|KeyArray|Literal|Self|NoneType|"
                  r"datetime|socket|float16|bfloat16|float32)"),
    (r"py:data", r".*"),
    (r"py:obj", r"(Any|Callable|typing\..*|collections\..*)"),
]

ROOT = HERE.parent


def _copy_notebooks(app):
  """The committed notebooks (with their outputs) into the source tree, rendered as pages."""
  target = HERE / "notebooks"
  target.mkdir(exist_ok=True)
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copyfile(notebook, target / notebook.name)


def setup(app):
  app.connect("builder-inited", _copy_notebooks)
