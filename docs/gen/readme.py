"""Sections of the README copied into the docs pages at build time (``<!-- nerve-readme: TITLE -->``).

The README is the one source of these sections; a page that names a section the README lacks fails the build.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"<!-- nerve-readme: (.+?) -->")


def section(title: str, text: str | None = None) -> str:
    """The body of the README's ``## TITLE`` section, its heading one level down, links made page-relative."""
    text = README.read_text(encoding="utf-8") if text is None else text
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError(f"README.md has no section '## {title}'")
    body = match.group(1).strip()
    body = re.sub(r"^(#{3,}) ", r"\1# ", body, flags=re.M)
    return f"## {title}\n\n" + body.replace("](docs/", "](") + "\n"


def expand(markdown: str) -> str:
    """Replace each marker by its README section.

    >>> expand("<!-- nerve-readme: Install -->").splitlines()[0]
    '## Install'
    """
    return MARKER.sub(lambda m: section(m.group(1)), markdown)
