#!/usr/bin/env python
"""Run a NerVE model-zoo experiment and write its result file.

    python benchmarks/run.py gpt2_activations --preset smoke
    python benchmarks/run.py --all --preset cpu --threads 1
    python benchmarks/run.py optimizers --preset paper --dry-run      # the plan, parameter counts on meta
    accelerate launch benchmarks/run.py gpt2_activations --preset paper --runs gelu

Each experiment (``benchmarks/experiments/<name>.json``) writes ``<out>/<preset>/<name>.json`` (see
benchmarks/README.md for its keys). The file is rewritten after every run, so an interrupted experiment
keeps what finished; ``--resume`` skips runs already in it (trained with the same settings: anything else
is an error). ``--set seed=N`` (N != 0) writes a seed replicate, ``<out>/<preset>/seeds/<name>.seedN.json``.
``python benchmarks/tables.py`` turns the files into tables and figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _*.py helpers next to this file
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # nerve_hf, nerve_zoo and model_adapters from a checkout

from _experiments import list_experiments, load_experiment  # noqa: E402
from _results import SCHEMA_VERSION, add_run, load_result, new_result, result_path, write_result  # noqa: E402
from _settings import PRESET_NAMES, run_settings, settings_differences  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiments", nargs="*", help=f"experiment names; known: {', '.join(list_experiments())}")
    parser.add_argument("--all", action="store_true", help="run every experiment")
    parser.add_argument("--preset", default="smoke", choices=PRESET_NAMES, help="settings preset (default: smoke)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results directory (files go to OUT/PRESET/)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="NAME", help="only these runs of the experiment(s)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        dest="overrides",
        help="override a RunSettings field for every selected run (JSON value, e.g. learning_rate=1e-3); "
        "repeatable; recorded in each run's settings",
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the result file, run the rest")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (settings, parameter counts) and exit")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--list", action="store_true", help="list experiments and their runs, then exit")
    args = parser.parse_args(argv)
    if args.all:
        args.experiments = list_experiments()
    if not args.experiments and not args.list:
        parser.error("name an experiment or pass --all (or --list)")
    return args


def parse_overrides(pairs: list[str]) -> dict:
    """``["learning_rate=1e-3", "dataset=digits"]`` -> ``{"learning_rate": 0.001, "dataset": "digits"}``."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set wants FIELD=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value  # a bare string
    return out


def selected_runs(experiment, preset: str, names) -> list:
    runs = experiment.runs_for(preset)
    if names:
        runs = [run for run in runs if run.name in names]
    return runs


def parameter_count(settings) -> int:
    """Parameters of the run's model, built on the meta device (no memory, no download)."""
    import torch

    import nerve_zoo as zoo

    vocab = settings.vocab_size if settings.task == "lm" and settings.tokenizer is None else None
    num_classes = {"digits": 10, "cifar100": 100}.get(settings.dataset) if settings.task == "image" else None
    extra = {"img_size": settings.image_size} if settings.task == "image" else {}
    with torch.device("meta"):
        model = zoo.build_model(
            settings.variant,
            size=settings.size,
            vocab_size=vocab,
            num_classes=num_classes,
            **extra,
            **settings.model_overrides,
        )
    return zoo.count_parameters(model)


def data_plan(settings) -> str:
    """The data part of a plan line; for packed tokens also whether the run fits in one epoch (reads meta.json
    only: the dry run builds no corpus)."""
    if settings.task != "lm":
        return f"{settings.dataset} {settings.image_size}px"
    tokens = settings.max_steps * settings.tokens_per_step
    text = f"{settings.dataset} ctx {settings.block_size} tokens/run {tokens / 1e6:.2f}M"
    if settings.packed_data:
        import _data
        import pack_corpus

        folder = _data.packed_folder(settings)
        try:
            meta = pack_corpus.read_meta(folder)
        except (FileNotFoundError, ValueError) as error:
            return f"packed {settings.packed_data} ctx {settings.block_size} tokens/run {tokens / 1e6:.2f}M ({error})"
        train = meta["tokens"]["train"] // settings.block_size * settings.block_size
        fits = settings.max_epochs is None or tokens <= settings.max_epochs * train
        text = (
            f"packed {meta['fingerprint']['corpus']} {meta['fingerprint']['id']} ctx {settings.block_size} "
            f"tokens/run {tokens / 1e6:.2f}M of {train / 1e6:.2f}M{'' if fits else ' REPEATS AN EPOCH'}"
        )
    elif settings.corpus_max_bytes and settings.dataset in ("stdlib-code", "python-env"):
        text += f" (corpus cap {settings.corpus_max_bytes / 1e6:g} MB)"
    return text


def describe(experiment, preset: str, names, overrides=None) -> str:
    lines = [f"{experiment.name} [{preset}]: {experiment.description}", f"  {experiment.section}"]
    for run in selected_runs(experiment, preset, names):
        s = experiment.resolve(run, preset, overrides)
        length = f"{s.max_steps} steps" if s.max_steps else f"{s.epochs:g} epochs"
        evals = f"eval/{s.eval_every}"
        if s.eval_dense_every and s.max_steps:
            evals = (
                f"eval/{s.eval_dense_every} to {s.eval_dense_until:.0%} then /{s.eval_every} "
                f"({len(s.eval_schedule(s.max_steps))} evals)"
            )
        lines.append(
            f"  - {run.name:<16} {s.variant:<20} size={s.size:<5} params={parameter_count(s) / 1e6:8.2f}M "
            f"{s.optimizer} lr={s.learning_rate:g} wd={s.weight_decay:g} batch={s.batch_size}x{s.grad_accum} "
            f"{length} {evals}{' bf16' if s.bf16 else ''} {data_plan(s)}"
        )
    return "\n".join(lines)


def check_resumable(experiment, preset: str, overrides, kept: dict, path: Path) -> None:
    """``--resume`` keeps a finished run only when it was trained with the settings asked for now: a file is
    never completed with runs of other settings (another ``--set``, an edited config)."""
    for run in experiment.runs_for(preset):
        if run.name not in kept:
            continue
        differ = settings_differences(
            run_settings(kept[run.name]["settings"]), experiment.resolve(run, preset, overrides)
        )
        if differ:
            shown = ", ".join(f"{key}: recorded {old!r}, asked {new!r}" for key, (old, new) in differ.items())
            raise SystemExit(
                f"--resume: run {run.name} in {path} was trained with other settings ({shown}); resume with the "
                "same --set options, or write elsewhere with --out"
            )


def check_schema(previous: dict, path: Path) -> None:
    """A file is completed (``--resume``) or updated (``--runs``) only by runs whose numbers mean what its own
    do: not across a change of ``SCHEMA_VERSION`` (schema 1's GPT-2 losses carry a (T-1)/T factor)."""
    version = previous.get("schema_version")
    if previous.get("runs") and version != SCHEMA_VERSION:
        raise SystemExit(
            f"{path} holds runs of result schema {version}, this checkout writes schema {SCHEMA_VERSION} "
            "(benchmarks/_results.py says what changed: schema 1's GPT-2 losses are (T-1)/T of the mean next-token "
            "loss); train the experiment into a new file with --out, or complete it from a checkout of its schema"
        )


def run_experiment(
    name: str,
    preset: str,
    out: str | Path = DEFAULT_OUT,
    runs=None,
    resume: bool = False,
    progress: bool = True,
    argv=None,
    overrides=None,
) -> Path:
    """Train the experiment's runs under ``preset``; returns the result file path."""
    from _train import train_run

    experiment = load_experiment(name)
    path = result_path(out, preset, experiment.name, seed=(overrides or {}).get("seed"))
    result = new_result(experiment, preset, argv if argv is not None else [name, "--preset", preset])
    if path.is_file() and (resume or runs):
        previous = load_result(path)
        if previous.get("preset") == preset:
            check_schema(previous, path)
            result["runs"] = previous.get("runs", {})  # --runs updates a file, --resume completes one
            result["corpora"] = previous.get("corpora", {})
    todo = selected_runs(experiment, preset, runs)
    if resume:
        check_resumable(experiment, preset, overrides, result["runs"], path)
        todo = [run for run in todo if run.name not in result["runs"]]
    try:
        from tqdm.auto import tqdm

        bar = tqdm(todo, desc=f"{experiment.name} [{preset}]", unit="run", disable=not progress)
    except ImportError:
        bar = todo
    for run in bar:
        if hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(run.name)
        settings = experiment.resolve(run, preset, overrides)
        add_run(result, run.name, train_run(settings, progress=progress), [r.name for r in experiment.runs])
        write_result(result, path)
        final = result["runs"][run.name]["final"]
        print(
            f"[{experiment.name}/{run.name}] "
            + ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, (int, float))),
            flush=True,
        )
    if not todo and not path.is_file() and path == result_path(out, preset, experiment.name):
        write_result(result, path)  # an experiment's file, even of no runs; a replicate of no runs is not written
    return path


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for name in list_experiments():
            experiment = load_experiment(name)
            print(f"{name}: {experiment.description}")
            for preset in PRESET_NAMES:
                print(f"  {preset}: {', '.join(run.name for run in experiment.runs_for(preset))}")
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.overrides)
    for name in args.experiments:
        experiment = load_experiment(name)
        if args.dry_run:
            print(describe(experiment, args.preset, args.runs, overrides))
            continue
        path = run_experiment(name, args.preset, args.out, args.runs, args.resume, not args.quiet, argv, overrides)
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
