"""MkDocs hooks (``hooks:`` in mkdocs.yml): fill in the generated blocks of the pages at build time."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pages  # noqa: E402  (after the path set-up above)
import readme  # noqa: E402


def on_page_markdown(markdown, page, config, files):
    """Replace each ``<!-- nerve-docs: NAME -->`` by the Markdown :mod:`pages` builds for NAME, and each
    ``<!-- nerve-readme: TITLE -->`` by the README's section TITLE (:mod:`readme`)."""
    return readme.expand(pages.expand(markdown))
