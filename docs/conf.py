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
exclude_patterns = ["_build", "_fragments"]  # _fragments: Markdown pieces that pages include
root_doc = "index"

# The optional modules import their packages; where one is absent (a docs-only
# environment), autodoc reads the module against a stand-in. Where it is present (CI), the
# real package is used, so that the doctest builder runs the integrations' examples.
_OPTIONAL = ("torch", "transformers", "dask", "distributed", "ml_dtypes")
_MISSING = {m for m in _OPTIONAL if importlib.util.find_spec(m) is None}
autodoc_mock_imports = sorted(_MISSING)
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
myst_heading_anchors = 3

html_theme = "pydata_sphinx_theme"
html_title = f"fastattn {release}"
html_theme_options = {"navigation_with_keys": False, "show_toc_level": 2,
                      "header_links_before_dropdown": 4}
# The left column lists a section's pages; the pages that stand alone get none (an empty
# column would only narrow the text).
html_sidebars = {page: [] for page in ("index", "install", "tutorial", "api", "performance",
                                       "DESIGN")}
html_static_path = ["_static"]
html_css_files = ["custom.css"]

# doctest builder: every ">>>" block on every page and in every docstring.
doctest_global_setup = "import numpy as np\nimport fastattn"
doctest_default_flags = 0  # exact output, as plain doctest and pytest see it


# Examples that need an optional package run only where it is installed: elsewhere (a
# '.[docs]'-only environment) they are shown, not run, and the build says which. Keyed by
# page, and by the module whose docstrings the examples come from.
_NEEDS = {
    "integrations/torch": ("torch",),
    "integrations/transformers": ("torch", "transformers"),
    "integrations/dask": ("dask", "distributed"),
    "fastattn.torch": ("torch",),
    "fastattn.integrations.transformers": ("torch", "transformers"),
    "fastattn.dask": ("dask", "distributed"),
}


def _missing_for(docname, source):
    """The optional packages a doctest block needs and this environment lacks."""
    source = source or ""
    keys = [docname] + [m for m in _NEEDS if f"docstring of {m}." in source
                        or source.endswith(f"docstring of {m}")]
    return sorted({p for key in keys for p in _NEEDS.get(key, ()) if p in _MISSING})


def _show_unrunnable_examples(app, doctree):
    from docutils import nodes
    from sphinx.util import logging

    docname = app.env.docname
    skipped = {}
    for block in list(doctree.findall(nodes.doctest_block)):
        missing = _missing_for(docname, block.source)
        if missing:
            shown = nodes.literal_block(block.rawsource, block.astext(), language="pycon")
            block.replace_self(shown)
            skipped.setdefault(", ".join(missing), 0)
            skipped[", ".join(missing)] += 1
    for missing, count in skipped.items():
        logging.getLogger(__name__).info(
            f"{docname}: {count} example(s) shown but not run: {missing} not installed")


def setup(app):
    app.connect("doctree-read", _show_unrunnable_examples)
