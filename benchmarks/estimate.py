#!/usr/bin/env python
"""Estimate what a preset costs before running it: a few timed steps and two evaluations per run, scaled up.

    python benchmarks/estimate.py --preset cpu-long --threads 1                 # every run of every experiment
    python benchmarks/estimate.py --preset cpu-long gpt2_width --steps 10       # one experiment

Per run it builds the run as ``run.py`` would (same data, model, optimizer, callbacks), trains ``--steps``
steps without evaluating, then evaluates twice (NerVE spectra included), and extrapolates to the preset's
steps and evaluation schedule. Both CPU time of this process (core-seconds: what a shared machine's load
does not inflate) and wall time are reported, per run and per experiment, with the total in core-hours.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from _experiments import list_experiments, load_experiment  # noqa: E402
from _settings import PRESET_NAMES  # noqa: E402


def full_steps(settings, info) -> int:
    if settings.max_steps > 0:
        return settings.max_steps
    n = info.get("train_images") or info.get("train_blocks")
    return max(1, round(settings.epochs * math.ceil(n / (settings.batch_size * settings.grad_accum))))


def measure(experiment, run, preset: str, steps: int) -> dict:
    """Seconds per step and per evaluation of one run, and the whole run extrapolated."""
    from _train import build_run

    settings = experiment.resolve(run, preset)
    probe = experiment.resolve(
        run, preset, {"max_steps": steps, "epochs": 0.0, "eval_every": 10**9, "eval_dense_every": 0}
    )
    with tempfile.TemporaryDirectory(prefix="nerve-estimate-") as output_dir:
        trainer, _, info = build_run(probe, output_dir, progress=False)
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.train()
        step_wall, step_cpu = (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps
        evals = []
        for _ in range(2):  # the first evaluation also warms the spectra code up: keep the faster one
            wall, cpu = time.perf_counter(), time.process_time()
            trainer.evaluate()
            evals.append((time.perf_counter() - wall, time.process_time() - cpu))
    eval_wall, eval_cpu = min(evals)
    n_steps = full_steps(settings, info)
    n_evals = len(settings.eval_schedule(n_steps))
    return {
        "run": run.name,
        "steps": n_steps,
        "evals": n_evals,
        "step_cpu_s": step_cpu,
        "eval_cpu_s": eval_cpu,
        "run_cpu_s": n_steps * step_cpu + n_evals * eval_cpu,
        "run_wall_s": n_steps * step_wall + n_evals * eval_wall,
    }


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiments", nargs="*", help="experiment names (default: all)")
    parser.add_argument("--preset", default="cpu-long", choices=PRESET_NAMES, help="preset (default: cpu-long)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME", help="only these runs")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run (default: 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rows = []
    print("| experiment | run | steps | evals | s/step | s/eval | core-s | wall s |\n|---|---|---|---|---|---|---|---|")
    for name in args.experiments or list_experiments():
        experiment = load_experiment(name)
        for run in experiment.runs_for(args.preset):
            if args.runs and run.name not in args.runs:
                continue
            row = {"experiment": name, **measure(experiment, run, args.preset, args.steps)}
            rows.append(row)
            print(
                f"| {name} | {row['run']} | {row['steps']} | {row['evals']} | {row['step_cpu_s']:.3f} | "
                f"{row['eval_cpu_s']:.2f} | {row['run_cpu_s']:.0f} | {row['run_wall_s']:.0f} |",
                flush=True,
            )
    total = sum(row["run_cpu_s"] for row in rows)
    print(f"\ntotal: {total:,.0f} core-s = {total / 3600:.2f} core-hours over {len(rows)} runs")
    return rows


if __name__ == "__main__":
    main()
