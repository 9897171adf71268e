"""Markdown that the docs generate at build time from the code itself, never committed.

Each builder returns one block of Markdown; :mod:`hooks` puts it where a page says
``<!-- nerve-docs: NAME -->``. ``tests/test_docs.py`` checks what they produce.

- ``cli``: ``--help`` of ``nerve``, of each of its subcommands and of ``scripts/run_clm.py``'s own
  argument groups, from the real parsers.
- ``adapters``: the supported-architecture table, from the adapter registry.
- ``families``: the supported families grouped by kind, with each stack's token source, and the refused
  families with their reasons, from the registry and ``model_adapters.refusals``.
- ``options``: the ``NerveConfig`` options table, from the dataclass fields (their help and default).
- ``variants``: the model zoo's variants, from ``nerve_zoo.VARIANTS``.
- ``benchmarks``: ``benchmarks/README.md``, its headings moved one level down.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HELP_WIDTH = "100"  # columns argparse wraps the help text to, whatever the terminal


@contextmanager
def _help_width():
    """argparse wraps to $COLUMNS: fix it, so the pages do not depend on the terminal that builds them."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _cell(text: str) -> str:
    """Plain text as one Markdown table cell: HTML escaped, pipes and newlines neutralised."""
    return html.escape(" ".join(str(text).split())).replace("|", "&#124;")


def _code_block(text: str, language: str = "text") -> str:
    return f"```{language}\n{text.rstrip()}\n```\n"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``parser`` by name (empty without subcommands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def run_clm_module():
    """``scripts/run_clm.py`` loaded from its file (scripts are not part of any package)."""
    name = "nerve_docs_run_clm"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "run_clm.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def run_clm_parser() -> argparse.ArgumentParser:
    """run_clm's own argument groups (model, data, NerVE); ``TrainingArguments`` are transformers'."""
    from transformers import HfArgumentParser

    run_clm = run_clm_module()
    return HfArgumentParser(
        (run_clm.ModelArguments, run_clm.DataTrainingArguments, run_clm.NerveArguments),
        prog="python scripts/run_clm.py",
    )


def cli_markdown() -> str:
    """The ``--help`` of every ``nerve`` (sub)command and of ``scripts/run_clm.py``, as Markdown sections."""
    from nerve_hf.cli import build_parser

    out = []
    with _help_width():
        parser = build_parser()
        out += ["## `nerve`\n", _code_block(parser.format_help())]
        for name, sub in subcommands(parser).items():
            out += [f"## `nerve {name}`\n", _code_block(sub.format_help())]
        out += [
            "## `scripts/run_clm.py`\n",
            "The model, data and NerVE flags below are the script's own; every flag of transformers' "
            "`TrainingArguments` (`--output_dir`, `--max_steps`, `--eval_strategy`, `--report_to`, ...) is "
            "accepted as well, as `python scripts/run_clm.py --help` lists. "
            "[run_clm.py vs upstream](run_clm.md) compares them with upstream's flag by flag.\n",
            _code_block(run_clm_parser().format_help()),
        ]
    return "\n".join(out)


def _table_modules():
    """Every module of ``model_adapters`` that holds table entries (an ``ADAPTERS`` dict), by file name."""
    import importlib
    import pkgutil

    import model_adapters

    modules = {}
    for info in pkgutil.iter_modules(model_adapters.__path__):
        module = importlib.import_module(f"model_adapters.{info.name}")
        if isinstance(getattr(module, "ADAPTERS", None), dict):
            modules[f"{info.name}.py"] = module
    return modules


def _registry():
    """key -> Adapter, as the registry holds it now, and the module that defines each entry."""
    from model_adapters import registry

    families = {}
    for filename, module in _table_modules().items():
        for key in module.ADAPTERS:
            families[key] = filename
    return {key: registry._REGISTRY[key] for key in registry.supported_types()}, families


def adapters_markdown() -> str:
    """The supported-architecture table: one row per FFN site family of every registered adapter."""
    adapters, families = _registry()
    lines = [
        "| key | in `model_adapters/` | site | blocks | pre (output of) | post (input of) | gated | stack | tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in adapters.items():
        # a ByConfig entry: one set of rows per config value
        choices = getattr(entry, "choices", None) or ((None, entry),)
        for value, adapter in choices:
            if isinstance(adapter, str):  # a layout refused with its reason (families_markdown lists it)
                continue
            when = f" (`{entry.attribute}={value}`)" if value is not None else ""
            for site in adapter.sites:
                pre = f"`{site.pre}`" + (f" chunk {site.pre_chunk[0]} of {site.pre_chunk[1]}" if site.pre_chunk else "")
                lines.append(
                    f"| `{key}` | `{families.get(key, 'register_adapter')}` | `{site.name}` | `{site.blocks}` | "
                    f"{pre}{when} | `{site.post}` | {'yes' if adapter.gated else 'no'} | {site.stack or '—'} | "
                    f"`{site.tokens}` |"
                )
    return "\n".join(lines) + f"\n\n{len(adapters)} registry keys.\n"


_KIND_TITLES = {
    "dense": "Dense FFNs",
    "shared_expert": "Shared experts (always on, beside routed experts)",
    "expert": "Routed experts",
}


def families_markdown() -> str:
    """Supported families by kind (one row per key and site family, with its stack and token source), then
    the families the table refuses and why."""
    from model_adapters.refusals import REFUSALS

    adapters, files = _registry()
    refused = dict(REFUSALS)  # key -> reason, with the layouts a ByConfig entry refuses
    by_kind: dict[str, list[str]] = {kind: [] for kind in _KIND_TITLES}
    for key, entry in adapters.items():
        # a ByConfig entry (the layout depends on a config attribute): the sites of every layout it knows
        layouts = [adapter for _, adapter in entry.choices] if hasattr(entry, "choices") else [entry]
        refused.update(
            {f"{key} ({entry.attribute}={v})": a for v, a in getattr(entry, "choices", ()) if isinstance(a, str)}
        )
        layouts = [adapter for adapter in layouts if not isinstance(adapter, str)]
        for site in dict.fromkeys(site for adapter in layouts for site in adapter.sites):
            chunk = f" (chunk {site.pre_chunk[0]} of {site.pre_chunk[1]})" if site.pre_chunk else ""
            by_kind.setdefault(site.kind, []).append(
                f"| `{key}` | `{files.get(key, 'register_adapter')}` | {site.stack or 'the model'} | "
                f"`{site.blocks}` | `{site.pre}`{chunk} -> `{site.post}` | `{site.tokens}` |"
            )
    out = []
    for kind, rows in by_kind.items():
        if not rows:
            continue
        out += [
            f"### {_KIND_TITLES.get(kind, kind)}\n",
            "| key | in `model_adapters/` | stack | blocks | pre -> post | token source |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    out += ["### Refused, with the reason\n", "| key | why |", "|---|---|"]
    out += [f"| `{key}` | {_cell(reason)} |" for key, reason in sorted(refused.items())]
    return "\n".join(out) + "\n"


def options_markdown() -> str:
    """The ``NerveConfig`` options: name, default and help (each is ``--nerve_<name>`` of ``run_clm.py``)."""
    from nerve_hf.integrations.config import NerveConfig

    lines = ["| option | default | what it does |", "|---|---|---|"]
    for f in fields(NerveConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        help_text = f.metadata["help"] + (f" Choices: {', '.join(map(str, choices))}." if choices else "")
        lines.append(f"| `{f.name}` | `{default!r}` | {_cell(help_text)} |")
    return "\n".join(lines) + "\n"


def variants_markdown() -> str:
    """The model zoo's variants: name, family, paper section and description."""
    from nerve_zoo import VARIANTS

    lines = ["| variant | family | paper | what it is |", "|---|---|---|---|"]
    for name, variant in VARIANTS.items():
        lines.append(f"| `{name}` | {variant.family} | {_cell(variant.section)} | {_cell(variant.description)} |")
    return "\n".join(lines) + "\n"


def benchmarks_markdown() -> str:
    """``benchmarks/README.md`` as a section of a page: every heading one level lower."""
    text = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(out) + "\n"


GENERATORS = {
    "cli": cli_markdown,
    "adapters": adapters_markdown,
    "families": families_markdown,
    "options": options_markdown,
    "variants": variants_markdown,
    "benchmarks": benchmarks_markdown,
}
MARKER = re.compile(r"<!--\s*nerve-docs:\s*([a-z_]+)\s*-->")


def expand(markdown: str) -> str:
    """``markdown`` with every ``<!-- nerve-docs: NAME -->`` replaced by what ``GENERATORS[NAME]`` builds."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise KeyError(f"unknown generated block {name!r}; known: {sorted(GENERATORS)}")
        return GENERATORS[name]()

    return MARKER.sub(replace, markdown)
