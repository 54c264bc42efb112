"""Sphinx configuration of fastattn's documentation site.

Build: ``pip install '.[docs]'`` then ``python -m sphinx -W -b html docs docs/_build/html``.
Examples: ``python -m sphinx -b doctest docs docs/_build/doctest`` runs every example on
every page and in every docstring; ``python -m pytest --doctest-glob='*.rst' docs`` and
``python -m pytest --doctest-modules --pyargs fastattn`` run the same examples without
Sphinx. The site documents the installed fastattn (its docstrings are imported).
"""

import importlib.util

import fastattn

project = "fastattn"
author = "the fastattn developers"
copyright = "2026, the fastattn developers"
release = fastattn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"

# The optional modules import their packages; where one is absent (a docs-only
# environment), autodoc reads the module against a stand-in. Where it is present (CI), the
# real package is used, so that the doctest builder runs the integrations' examples.
autodoc_mock_imports = [m for m in ("torch", "transformers", "dask", "distributed", "ml_dtypes")
                        if importlib.util.find_spec(m) is None]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = f"fastattn {release}"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2}
html_static_path = []

# doctest builder: every ">>>" block on every page and in every docstring.
doctest_global_setup = "import numpy as np\nimport fastattn"
doctest_default_flags = 0  # exact output, as plain doctest and pytest see it
