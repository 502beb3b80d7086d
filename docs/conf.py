"""Sphinx configuration: MyST Markdown pages, the API reference from the docstrings, built offline.

Built with ``make docs`` (warnings are errors). No inventory is fetched: torch's, Lightning's and
torchao's pages are linked by URL, so the build needs no network. Two pages are generated here, at
the start of every build (below), from the repository itself: the benchmark tables (``benchmarks/results/``,
written by the ``make bench-*`` targets) and the index of every error message the library raises.
"""

from __future__ import annotations

import sys
from importlib.metadata import version as _version
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS))

from _generate import generate_all  # noqa: E402

project = "lightning-quant"
author = "the lightning-quant authors"
copyright = "2026, the lightning-quant authors"
release = _version("lightning-quant")
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.autosummary",
    "sphinx.ext.extlinks",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "README.md"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# Names in signatures and docstrings that belong to torch, Lightning, torchao: not cross-referenced
# (their inventories are not fetched), so they are rendered as code, not as broken links.
nitpicky = False

extlinks = {
    "torch": ("https://docs.pytorch.org/docs/stable/%s", "%s"),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/%s", "%s"),
    "torchao": ("https://docs.pytorch.org/ao/stable/%s", "%s"),
}

html_theme = "alabaster"
html_title = f"lightning-quant {release}"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Int8 and int4 quantization as Lightning callbacks",
    "fixed_sidebar": True,
    "page_width": "1200px",
    "sidebar_width": "260px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "searchbox.html"]}


generate_all(DOCS)  # before Sphinx reads the sources: the generated pages are sources too
