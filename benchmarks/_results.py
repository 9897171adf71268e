"""Result files: ``<out>/<preset>/<experiment>.json``, one per experiment, written after every run; runs with
another seed (``--set seed=N``) are replicates in ``<out>/<preset>/seeds/<experiment>.seed<N>.json``."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

# Bump when the layout below, or what a number in it means, changes:
# 1: a GPT-2 run's losses (eval_loss, train_loss, perplexity) are (T-1)/T of the mean next-token cross-entropy
#    (T = block_size): GPT2LMHeadModel had no loss_type, so the Trainer divided the B*(T-1) token losses by B*T.
#    LLaMA and Mixer runs are the same in both versions.
# 2: every causal LM's loss is the mean next-token cross-entropy over its predicted tokens (nerve_zoo.gpt2 names
#    GPT-2's loss type), the loss upstream's run_clm.py and `nerve probe --eval-loss` report.
SCHEMA_VERSION = 2
SCALED_LOSS_SCHEMAS = (1,)  # result files whose GPT-2 losses carry the (T-1)/T factor
SIGNIFICANT_DIGITS = 7  # floats are stored rounded: the files stay small and diff-able


# a JSON list holding only numbers/null/strings/bools, spread over lines by indent=1: put it on one line
_SCALAR_LIST = re.compile(r"\[((?:\s*(?:-?[0-9][0-9.eE+-]*|null|true|false|\"[^\",\[\]{}]*\"),?)+\s*)\]")


REPLICATES = "seeds"  # folder of a preset's seed replicates


def result_path(out_dir: str | Path, preset: str, experiment: str, seed: int | None = None) -> Path:
    """The experiment's result file; with a ``seed`` other than the presets' (0), its replicate file."""
    if seed is None or seed == 0:
        return Path(out_dir) / preset / f"{experiment}.json"
    return Path(out_dir) / preset / REPLICATES / f"{experiment}.seed{seed}.json"


def replicate_seed(result: dict) -> int:
    """The seed every run of a (replicate) result file was trained with."""
    seeds = {entry["settings"]["seed"] for entry in result["runs"].values()}
    if len(seeds) != 1:
        raise ValueError(f"{result['experiment']}: a replicate file holds one seed, found {sorted(seeds)}")
    return seeds.pop()


def environment() -> dict:
    """Versions and machine facts for the provenance block."""
    import torch
    import transformers

    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    commit = _git("rev-parse", "HEAD") or os.environ.get("NERVE_GIT_COMMIT")  # a copied tree has no .git
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm_version,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),  # tracked files (results aside) differ from it
    }


def _git(*args: str) -> str | None:
    """Output of ``git ARGS`` in this checkout, None outside a git checkout (an exported tree, no git)."""
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parents[1]
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def new_result(experiment, preset: str, argv: list[str]) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "experiment": experiment.name,
        "preset": preset,
        "task": experiment.task,
        "section": experiment.section,
        "description": experiment.description,
        "baseline": experiment.baseline,
        "labels": {run.name: run.label for run in experiment.runs},
        "command": " ".join(["python", "benchmarks/run.py", *argv]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "corpora": {},  # corpus id -> fingerprint of the data the runs used (each run's provenance.corpus_id)
        "runs": {},
    }


def add_run(result: dict, name: str, entry: dict, order: list[str]) -> None:
    """Put ``entry`` (of ``train_run``) under ``result["runs"][name]`` in config order; its data fingerprint goes
    to ``result["corpora"]`` and the run keeps the id. A run on other data than the file's earlier runs (an
    environment changed between ``--resume`` calls) adds a second corpus and a warning. The run also keeps the
    commit it was trained at (``provenance.git_commit``, ``git_dirty``): a file completed by ``--resume``
    calls at several commits says which run came from which, while its ``environment`` is the last call's."""
    if "environment" in result:
        entry["provenance"].setdefault("git_commit", result["environment"].get("git_commit"))
        entry["provenance"].setdefault("git_dirty", result["environment"].get("git_dirty"))
    fingerprint = entry["provenance"].pop("corpus_fingerprint", None)
    if fingerprint is not None:
        corpora = result.setdefault("corpora", {})
        if corpora and fingerprint["id"] not in corpora:
            print(
                f"warning: run {name} used corpus {fingerprint['id']}, the file's other runs {sorted(corpora)}",
                file=sys.stderr,
            )
        corpora[fingerprint["id"]] = fingerprint
        entry["provenance"]["corpus_id"] = fingerprint["id"]
    result["runs"][name] = entry
    result["runs"] = dict(
        sorted(result["runs"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    )


def load_result(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def rounded(value):
    if isinstance(value, float):
        if not math.isfinite(value):
            return None  # strict JSON
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {key: rounded(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item) for item in value]
    return value


def write_result(result: dict, path: str | Path) -> Path:
    """Write atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    text = json.dumps(rounded(result), indent=1, allow_nan=False)
    text = _SCALAR_LIST.sub(lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]", text)
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


def python_argv() -> list[str]:
    return sys.argv[1:]


def scaled_loss_note(results: dict) -> str | None:
    """The README note for result files (experiment name -> result) written before schema 2 that hold GPT-2
    language-model runs: their losses are (T-1)/T of the mean next-token cross-entropy. None when none does."""
    scaled = {
        name: sorted({entry["settings"]["block_size"] for entry in result["runs"].values()})
        for name, result in results.items()
        if result.get("schema_version") in SCALED_LOSS_SCHEMAS
        and result.get("task") == "lm"
        and any(str(entry["settings"].get("variant", "")).startswith("gpt2") for entry in result["runs"].values())
    }
    if not scaled:
        return None
    blocks = sorted({t for sizes in scaled.values() for t in sizes})
    factors = ", ".join(f"{t - 1}/{t}" for t in blocks)
    return (
        f"**Losses of the GPT-2 runs.** These result files ({', '.join(f'`{name}`' for name in scaled)}; schema "
        f"version {', '.join(map(str, SCALED_LOSS_SCHEMAS))}) were trained before the zoo GPT-2 named its loss type: "
        f"their eval and train losses are (T-1)/T of the mean next-token cross-entropy (T = the context, so "
        f"{factors}), and their perplexities exp of that: below the true ones by a factor exp(loss / (T-1)) of the "
        "reported loss. Every GPT-2 run of one context carries the same factor, so which run has the lower loss, "
        "and every correlation with the loss (Pearson r does not change when a series is multiplied by a positive "
        "constant), are unaffected; LLaMA and Mixer runs never carried it. Runs trained now (schema 2) report the "
        "mean next-token cross-entropy, and `run.py` refuses to add them to a file of schema 1."
    )
