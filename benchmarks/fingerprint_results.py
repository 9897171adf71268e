#!/usr/bin/env python
"""Add the data fingerprint to result files written before fingerprints were recorded.

    python benchmarks/fingerprint_results.py cpu          # every results/cpu/*.json without "corpora"

For each run of such a file the data its recorded settings name is built again (the embedded corpus, the
locally trained tokenizer, the LM blocks; or the seeded image split) and its size is compared with what the
run recorded (train and eval blocks, or images). Only when every run matches does the file gain ``corpora``
and each run ``provenance.corpus_id``; the fingerprint says it was added after the runs (``recorded``), by
which commit, and what was compared. A mismatch changes nothing and names the run: those runs need
training again. Files that already have a fingerprint are left alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import image_data, lm_data  # noqa: E402
from _results import environment, write_result  # noqa: E402
from _settings import run_settings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
COMPARED = {"lm": ("train_blocks", "eval_blocks"), "image": ("train_images", "eval_images")}


def fingerprint_of_run(entry: dict) -> tuple[dict | None, str]:
    """``(fingerprint, "")`` when the rebuilt data match the run's provenance, else ``(None, why)``."""
    settings = run_settings(entry["settings"])
    info = (lm_data if settings.task == "lm" else image_data)(settings)[-1]
    provenance = entry["provenance"]
    for key in COMPARED[settings.task]:
        if info[key] != provenance.get(key):
            return None, f"{key}: recorded {provenance.get(key)}, rebuilt {info[key]}"
    return info["corpus_fingerprint"], ""


def add_fingerprints(path: Path) -> str:
    """Fingerprint one result file in place when all its runs match; returns a line saying what happened."""
    result = json.loads(path.read_text())
    if result.get("corpora"):
        return f"{path.name}: already fingerprinted"
    corpora, ids = {}, {}
    for name, entry in result["runs"].items():
        fingerprint, why = fingerprint_of_run(entry)
        if fingerprint is None:
            return f"{path.name}: unchanged, run {name} does not match its data ({why}); train it again"
        corpora[fingerprint["id"]] = fingerprint
        ids[name] = fingerprint["id"]
    commit = environment().get("git_commit")
    compared = " and ".join(COMPARED[result["task"]])
    for fingerprint in corpora.values():
        fingerprint["recorded"] = (
            f"after the runs, by benchmarks/fingerprint_results.py at commit {commit}: the data the runs' settings "
            f"name, built again, match every run's {compared}"
        )
    for name, corpus_id in ids.items():
        result["runs"][name]["provenance"]["corpus_id"] = corpus_id
    result["corpora"] = corpora
    write_result(result, path)
    return f"{path.name}: fingerprint {', '.join(sorted(corpora))} added ({len(ids)} runs matched)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="results/PRESET/*.json are checked")
    parser.add_argument("--results", default=str(RESULTS), help="results directory holding PRESET/*.json")
    args = parser.parse_args(argv)
    paths = sorted((Path(args.results) / args.preset).glob("*.json"))
    if not paths:
        parser.error(f"no result files in {Path(args.results) / args.preset}")
    for path in paths:
        print(add_fingerprints(path))


if __name__ == "__main__":
    main()
