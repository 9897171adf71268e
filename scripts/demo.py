#!/usr/bin/env python
"""The NerVE demo: train a small GPT-2 from scratch on CPU and watch its FFN eigenspectra.

Fully offline: the corpus is the Python standard library's own source code, the tokenizer is a byte-level
BPE trained on it locally (cached after the first run), and the model is built from a config. It runs
``scripts/run_clm.py --nerve`` with periodic evaluation, checkpoints and TensorBoard logs, then prints the
last measurement of every FFN layer from ``<output_dir>/nerve_metrics.jsonl``.

    python scripts/demo.py                  # ~23 core-minutes (11.5 min on 2 cores); output in runs/demo
    python scripts/demo.py --quick          # ~30 s smoke test of every stage; too short for trends
    tensorboard --logdir runs/demo          # loss, eval loss and nerve/* curves
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from nerve_hf.metrics import METRIC_NAMES

MARKER = ".nerve_demo_run"  # marks a directory this script created, so a rerun may replace it
PRESETS_FILE = Path(__file__).with_name("demo_presets.json")  # the demo sizes; benchmarks/perf reads it too


@dataclass(frozen=True)
class DemoPreset:
    """Model, data and cadence of one demo size (values in ``demo_presets.json``).

    Evaluation and checkpoints come every 20% of the steps.
    """

    max_steps: int  # optimizer steps
    n_layer: int  # transformer blocks, one FFN each
    n_embd: int  # model width; FFN width is 4x this
    n_head: int  # attention heads
    block_size: int  # tokens per sequence (also the model's context length)
    batch_size: int  # sequences per optimizer step
    learning_rate: float  # peak AdamW learning rate (cosine decay, 5% warmup)
    nerve_every: int  # measure spectra of every N-th step's training batch
    max_eval_samples: int  # eval blocks per evaluation
    corpus_bytes: int  # cap on the stdlib corpus (the tokenizer is cached per cap)
    vocab_size: int  # BPE vocabulary trained on it


def load_presets(path: Path = PRESETS_FILE) -> dict[str, DemoPreset]:
    """The demo sizes by name (``full``, ``quick``), read from ``demo_presets.json`` next to this script."""
    return {name: DemoPreset(**fields) for name, fields in json.loads(path.read_text()).items()}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", default="runs/demo", help="Run directory (replaced if an earlier demo made it)."
    )
    parser.add_argument(
        "--max-steps", type=int, default=None, help="Optimizer steps (default: 600, or 40 with --quick)."
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A tiny model for ~30 s: a smoke test that every stage runs (too short for trends).",
    )
    parser.add_argument("--no-nerve", action="store_true", help="Train without the NerVE callback (for comparison).")
    parser.add_argument("--nerve-every", type=int, default=None, help="Measure every N steps (default: preset's).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for model init and data order.")
    return parser.parse_args(argv)


def prepare_output_dir(path: Path) -> None:
    """Start from an empty directory; only a previous demo run (it has the marker) is ever deleted."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).exists():
            raise SystemExit(f"{path} exists and was not made by this demo; pass another --output-dir")
        print(f"replacing the previous demo run in {path}")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("created by scripts/demo.py; a rerun replaces this directory\n")


def run_clm_argv(
    preset: DemoPreset, output_dir: Path, max_steps: int, nerve_every: int, nerve: bool, seed: int
) -> list[str]:
    """The ``run_clm.py`` command line of the demo."""
    import torch

    every = max(1, max_steps // 5)  # evaluate and checkpoint at 20%, 40%, ... 100%
    overrides = (
        f"n_layer={preset.n_layer},n_embd={preset.n_embd},n_head={preset.n_head},n_positions={preset.block_size},"
        "resid_pdrop=0.0,embd_pdrop=0.0,attn_pdrop=0.0"  # short runs: dropout only slows learning down
    )
    argv = [
        "--output_dir",
        str(output_dir),
        "--do_train",
        "--do_eval",
        "--config_overrides",
        overrides,
        "--block_size",
        str(preset.block_size),
        "--embedded_max_bytes",
        str(preset.corpus_bytes),
        "--embedded_vocab_size",
        str(preset.vocab_size),
        "--max_steps",
        str(max_steps),
        "--per_device_train_batch_size",
        str(preset.batch_size),
        "--per_device_eval_batch_size",
        str(2 * preset.batch_size),
        "--learning_rate",
        str(preset.learning_rate),
        "--lr_scheduler_type",
        "cosine",
        "--warmup_steps",
        str(max(1, max_steps // 20)),
        "--weight_decay",
        "0.1",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(every),
        "--save_strategy",
        "steps",
        "--save_steps",
        str(every),
        "--save_total_limit",
        "2",
        "--logging_steps",
        str(max(1, min(nerve_every, max_steps // 20))),
        "--max_eval_samples",
        str(preset.max_eval_samples),
        "--report_to",
        "tensorboard",
        "--seed",
        str(seed),
        "--dataloader_pin_memory",
        str(torch.cuda.is_available()).lower(),
    ]
    if nerve:
        argv += ["--nerve", "--nerve_every_n_steps", str(nerve_every)]
    return argv


def last_measurements(jsonl_path: Path) -> dict[tuple[str, str], dict]:
    """The last record per (split, site) in a ``nerve_metrics.jsonl``; unreadable lines are skipped."""
    latest: dict[tuple[str, str], dict] = {}
    if not jsonl_path.is_file():
        return latest
    for line in jsonl_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "site" not in record:
            continue
        key = (str(record.get("split", "train")), str(record["site"]))
        previous = latest.get(key)
        if previous is None or _step(record) >= _step(previous):
            latest[key] = record
    return latest


def _step(record: dict) -> float:
    step = record.get("step")
    return step if isinstance(step, (int, float)) else -math.inf


def _cell(value) -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _mean(values) -> Optional[float]:
    """Mean over layers of the numeric values (NaN propagates: a NaN layer makes the mean NaN)."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) / len(numbers) if numbers else None


def _layer_key(record: dict):
    layer = record.get("layer")
    return (0, layer, str(record.get("site"))) if isinstance(layer, int) else (1, 0, str(record.get("site")))


def summary_table(latest: dict[tuple[str, str], dict]) -> str:
    """A per-layer table of the last measurement of each FFN, one block per split."""
    if not latest:
        return "no NerVE measurements found"
    columns = ("layer", "site", "step", "tokens") + METRIC_NAMES
    blocks = []
    splits = sorted({split for split, _ in latest}, key=lambda s: (s != "train", s))  # train first
    for split in splits:
        records = sorted((r for (s, _), r in latest.items() if s == split), key=_layer_key)
        rows = [[_cell(r.get(c)) for c in columns] for r in records]
        if len(records) > 1:
            rows.append(["mean", "", "", ""] + [_cell(_mean(r.get(c) for r in records)) for c in METRIC_NAMES])
        widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
        lines = [f"[{split}] last measurement per FFN"]
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
        lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_report_if_available(run_dir: Path) -> None:
    """``nerve_hf.analysis.report.write_report``: correlations with the eval loss and plots; a run too short to
    correlate says why and keeps its files."""
    from nerve_hf.analysis.report import write_report  # errors inside the module are real errors: let them raise
    from nerve_hf.errors import InputError

    try:
        result = write_report(run_dir)
    except InputError as exc:  # a run too short to correlate (e.g. --max-steps 2): say why, keep the run
        print(f"no report: {exc}")
        return
    out_dir = getattr(result, "out_dir", run_dir)
    print(f"report (correlations with eval loss, plots): {out_dir}   (or: nerve report {run_dir})")


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    preset = load_presets()["quick" if args.quick else "full"]
    max_steps = args.max_steps or preset.max_steps
    nerve_every = args.nerve_every or preset.nerve_every
    output_dir = Path(args.output_dir)

    prepare_output_dir(output_dir)
    print(
        f"NerVE demo: GPT-2 from scratch ({preset.n_layer} layers, width {preset.n_embd}, block {preset.block_size}), "
        f"{max_steps} steps on the stdlib code corpus -> {output_dir}"
    )
    import run_clm  # scripts/run_clm.py: `python scripts/demo.py` puts scripts/ first on sys.path

    metrics = run_clm.main(
        run_clm_argv(preset, output_dir, max_steps, nerve_every, nerve=not args.no_nerve, seed=args.seed)
    )

    print()
    print(summary_table(last_measurements(output_dir / "nerve_metrics.jsonl")))
    print()
    if "eval_loss" in metrics:
        print(f"final eval loss {metrics['eval_loss']:.3f}, perplexity {metrics['eval_perplexity']:.1f}")
    print(f"run directory: {output_dir}   (tensorboard --logdir {output_dir})")
    write_report_if_available(output_dir)
    return metrics


if __name__ == "__main__":
    main()
