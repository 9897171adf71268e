"""MkDocs hooks (``hooks:`` in mkdocs.yml): fill in the generated blocks of the pages at build time."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pages  # noqa: E402  (after the path set-up above)


def on_page_markdown(markdown, page, config, files):
    """Replace each ``<!-- nerve-docs: NAME -->`` by the Markdown :mod:`pages` builds for NAME."""
    return pages.expand(markdown)
