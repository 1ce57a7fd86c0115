"""Sphinx configuration of pyvduse's API reference (``sphinx-build -W docs/api docs/api/_build``).

The reference is generated from the docstrings of the public names (``pyvduse.__all__``);
the guides next to it are Markdown, read on their own."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

project = "pyvduse"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
