"""The documentation site: Markdown pages (MyST) built by Sphinx with the furo theme.

    .venv/bin/python -m sphinx -W --keep-going -n -b html docs docs/_build/html

-W: every warning fails the build (.ci/run builds it so), and with MyST a link to a page or heading that does not
exist is a warning. The reference pages under reference/ are made from the code by scripts/docs_reference.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cnnlab.core.version import __version__  # noqa: E402

project = "cnnlab"
release = version = __version__
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"cnnlab {version}"
myst_heading_anchors = 3  # [text](page.md#a-heading) links resolve, and are checked
myst_enable_extensions = ["colon_fence"]
suppress_warnings: list[str] = []
