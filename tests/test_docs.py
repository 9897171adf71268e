"""The API reference's promises that can be checked without building it (CI builds it: ``bash dev.sh docs``).

- Every public name of DESIGN §3 has a docstring example, and it runs.
- The pages generated at build time (``docs/gen/pages.py``) hold what they claim: every ``nerve``
  subcommand, run_clm's flags, every registered adapter, every ``NerveConfig`` option.
- The docstring rewriting of ``docs/gen/griffe_roles.py`` resolves names as Python would.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import sys
from dataclasses import fields
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The public API of DESIGN §3, each name as it is imported there.
SECTION_3 = [
    "nerve_hf.metrics.spectral_entropy",
    "nerve_hf.metrics.participation_ratio",
    "nerve_hf.metrics.early_enrichment",
    "nerve_hf.metrics.js_divergence",
    "nerve_hf.metrics.spectrum_metrics",
    "nerve_hf.CovarianceAccumulator",
    *(
        f"nerve_hf.CovarianceAccumulator.{name}"
        for name in (
            "update",
            "merge",
            "sync",
            "count",
            "skipped",
            "mean",
            "covariance",
            "eigenvalues",
            "reset",
            "state_dict",
            "load_state_dict",
        )
    ),
    "nerve_hf.FFNTracker",
    "nerve_hf.FFNTracker.compute",
    "nerve_hf.SpectralReport",
    "nerve_hf.SpectralReport.to_pandas",
    "nerve_hf.NerveCallback",
    "model_adapters.get_adapter",
    "model_adapters.register_adapter",
]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE  # as pyproject's doctest_optionflags


def _load(dotted: str):
    """(object, globals of the module that defines it) for ``package.Name.attribute`` (properties as such)."""
    package, *names = dotted.split(".")
    obj = importlib.import_module(package)
    owner = obj
    for name in names:
        owner = obj
        obj = vars(obj)[name] if isinstance(obj, type) and name in vars(obj) else getattr(obj, name)
    target = obj.fget if isinstance(obj, property) else obj
    module = sys.modules[getattr(target, "__module__", None) or owner.__name__]
    return obj, vars(module)


@pytest.mark.parametrize("dotted", SECTION_3)
def test_section_3_name_has_an_example_that_runs(dotted):
    obj, globs = _load(dotted)
    tests = doctest.DocTestFinder(recurse=False).find(obj, dotted, globs=globs)
    examples = [example for test in tests for example in test.examples]
    assert examples, f"{dotted} has no docstring example (>>>)"
    lines = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test, out=lines.append)
    assert runner.failures == 0, "".join(lines)


def _pages():
    spec = importlib.util.spec_from_file_location("nerve_docs_pages", ROOT / "docs" / "gen" / "pages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_has_every_subcommand_and_run_clm_flags():
    from nerve_hf.cli import build_parser

    pages = _pages()
    text = pages.cli_markdown()
    subcommands = pages.subcommands(build_parser())
    assert set(subcommands) >= {"probe", "report"}
    for name, parser in subcommands.items():
        assert f"## `nerve {name}`" in text
        assert f"usage: nerve {name}" in text
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in text, (name, flag)
    # run_clm's --help used to crash on a "%" in a NerveConfig help text; here it is rendered whole.
    assert "usage: python scripts/run_clm.py" in text
    for flag in ("--model_name_or_path", "--block_size", "--nerve", "--nerve_every_n_steps", "--nerve_metrics"):
        assert flag in text
    assert "k % every_n_steps" in " ".join(text.split())


def test_run_clm_help_renders_with_training_arguments():
    """``python scripts/run_clm.py --help``'s parser, built in process: every help text formats."""
    from transformers import HfArgumentParser, TrainingArguments

    run_clm = _pages().run_clm_module()
    dataclasses = (run_clm.ModelArguments, run_clm.DataTrainingArguments, TrainingArguments, run_clm.NerveArguments)
    text = HfArgumentParser(dataclasses).format_help()
    assert "--output_dir" in text and "--nerve_layers_per_step" in text


def test_adapters_page_lists_every_registered_adapter():
    import model_adapters

    text = _pages().adapters_markdown()
    rows = re.findall(r"^\| `([^`]+)` \|", text, flags=re.MULTILINE)
    assert set(rows) == set(model_adapters.supported_types())
    assert "| `gpt2` | `gpt.py` | `ffn` | `h` | `mlp.c_fc` | `mlp.c_proj` | no |" in text
    assert "`mlp.gate_up_proj` chunk 0 of 2" in text  # Phi-3's fused gate/up projection


def test_options_page_lists_every_nerve_config_field():
    from nerve_hf.integrations.config import NerveConfig

    text = _pages().options_markdown()
    for f in fields(NerveConfig):
        assert f"| `{f.name}` |" in text
    assert "| `every_n_steps` | `100` | Measure the training micro-batches" in text
    assert "&lt;output_dir&gt;" in text  # help text is escaped, not read as HTML


def test_generated_blocks_are_expanded_and_unknown_ones_refused():
    pages = _pages()
    assert "| `gpt2-gelu` |" in pages.expand("<!-- nerve-docs: variants -->")
    assert pages.benchmarks_markdown().startswith("## benchmarks")
    with pytest.raises(KeyError, match="nope"):
        pages.expand("<!-- nerve-docs: nope -->")


def test_every_page_in_the_nav_exists_and_names_known_blocks():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = _pages()
    for entry in config["nav"]:
        (page,) = entry.values()
        text = (ROOT / "docs" / page).read_text()
        assert set(pages.MARKER.findall(text)) <= set(pages.GENERATORS), page


def test_docstring_roles_become_autorefs_resolved_from_their_scope():
    griffe = pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("nerve_docs_roles", ROOT / "docs" / "gen" / "griffe_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    package = griffe.load("nerve_hf", search_paths=[str(ROOT)])
    tracker = package["tracking.tracker.FFNTracker"]
    assert roles.identifier(tracker, "compute") == "nerve_hf.tracking.tracker.FFNTracker.compute"
    assert roles.identifier(tracker, "SpectralReport") == "nerve_hf.report.SpectralReport"
    assert roles.identifier(package["metrics"], "nerve_hf.FFNTracker") == "nerve_hf.tracking.tracker.FFNTracker"
    text = roles.rewrite(
        tracker, "See :meth:`reset` and :class:`~nerve_hf.tracking.windows.Window`::\n\n>>> 1 + 1\n2\n"
    )
    assert (
        '<autoref identifier="nerve_hf.tracking.tracker.FFNTracker.reset" optional><code>reset</code></autoref>' in text
    )
    assert '<autoref identifier="nerve_hf.tracking.windows.Window" optional><code>Window</code></autoref>:\n' in text
    assert "```pycon\n>>> 1 + 1\n2\n```" in text


def test_readme_and_ci_point_at_the_docs_build():
    assert "bash dev.sh docs" in (ROOT / "README.md").read_text(encoding="utf-8")
    assert "site/index.html" in (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert ci.index("bash dev.sh test") < ci.index("bash dev.sh docs")
