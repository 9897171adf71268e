"""Griffe extension: the reStructuredText bits of this project's docstrings, as mkdocstrings renders them.

The docstrings are Google style with Sphinx cross-reference roles (``:func:`name```, ``:class:`~a.B```,
``:meth:`compute```), ``::`` before literal blocks and bare doctest examples (``>>>`` lines and their
output up to a blank line), which become ``pycon`` code blocks. Each role becomes an *optional* autoref: a link
when its target is on one of the pages, plain code when it is not (a private helper, a module the
reference leaves out). Names are resolved as Python would from where the docstring is, and the lazy
exports of ``nerve_hf`` and ``nerve_zoo`` (``nerve_hf.FFNTracker``) are followed to where they are
defined. Cross-references written in the pages themselves stay strict: a broken one fails the build.
"""

from __future__ import annotations

import html
import importlib
import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|data|mod|attr|exc|obj|const):`(~?)([A-Za-z_][\w.]*)`")
LITERAL_BLOCK = re.compile(r"(?<=\S)::$", flags=re.MULTILINE)  # "text::" introducing an indented block
LAZY_PACKAGES = ("nerve_hf", "nerve_zoo")  # packages whose top-level names are lazy re-exports


def _follow_lazy_export(path: str) -> str:
    """``nerve_hf.FFNTracker`` -> ``nerve_hf.tracking.tracker.FFNTracker`` (names the package loads on first use)."""
    package, _, rest = path.partition(".")
    if package not in LAZY_PACKAGES or not rest:
        return path
    name, _, tail = rest.partition(".")
    lazy = getattr(importlib.import_module(package), "_LAZY", {})
    if not lazy.get(name):
        return path
    return ".".join(part for part in (package, lazy[name], name, tail) if part)


def identifier(obj: griffe.Object, target: str) -> str:
    """The full dotted path that ``target``, written in ``obj``'s docstring, refers to."""
    head, _, tail = target.partition(".")
    try:
        base = obj.resolve(head)
    except (griffe.NameResolutionError, AttributeError):
        return _follow_lazy_export(target)  # an absolute path, or nothing griffe knows
    return _follow_lazy_export(f"{base}.{tail}" if tail else base)


def fence_doctests(text: str) -> str:
    """Every bare doctest block of ``text`` (from a ``>>>`` line to the next blank line) as a code block."""
    out, indent, fenced = [], None, False
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("```"):
            fenced = not fenced
        if indent is None and not fenced and stripped.startswith(">>>"):
            indent = line[: len(line) - len(stripped)]
            out.append(indent + "```pycon")
        elif indent is not None and not stripped:
            out.append(indent + "```")
            indent = None
        out.append(line)
    if indent is not None:
        out.append(indent + "```")
    return "\n".join(out)


def rewrite(obj: griffe.Object, text: str) -> str:
    """``text`` with its doctests fenced, its roles as optional autorefs and its ``::`` as ``:``."""

    def autoref(match: re.Match) -> str:
        short, target = match.group(1), match.group(2)
        title = target.rsplit(".", 1)[-1] if short else target
        return f'<autoref identifier="{html.escape(identifier(obj, target))}" optional><code>{title}</code></autoref>'

    return LITERAL_BLOCK.sub(":", ROLE.sub(autoref, fence_doctests(text)))


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


class RstRoles(griffe.Extension):
    """Rewrite every docstring of a loaded package once, before mkdocstrings parses it."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in _objects(pkg):
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
