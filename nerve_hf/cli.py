"""The ``nerve`` command: ``nerve probe MODEL`` and ``nerve report RUN_DIR``.

Bad input (a path that is not a model, an unsupported architecture, an empty text file, an output folder
that cannot be written, ...) ends with one line on stderr and exit status 2, never a traceback; an unusable
``--out`` is reported before anything is loaded or measured. Heavy libraries load only once a subcommand
runs, so ``nerve --help`` is quick.

The flags of ``nerve probe`` are the fields of :class:`nerve_hf.probe.ProbeConfig`
(:func:`add_option_arguments`); only ``--out`` and ``--no-plots``, which concern the command and not the
measurement, are written here.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "add_option_arguments"]

EXIT_INPUT = 2  # bad input the user can fix
EXIT_INTERRUPTED = 130


def _int_list(text: str) -> list[int]:
    """``"0,3,-1"`` -> ``[0, 3, -1]``."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,5,-1; got {text!r}") from None


def _text_list(text: str) -> list[str]:
    """``"step1000, step2000"`` -> ``["step1000", "step2000"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_blocks\": 2}}'; got {text!r}")
    return value


def _argument_type(annotation):
    """argparse ``type`` for an option field's annotation: ``Optional[X]`` as X; ``list[int]`` as a comma
    list (:func:`_int_list`), ``list[str]`` as a comma list of strings, ``dict`` as a JSON object;
    ``int``/``str`` as themselves."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (int,):
        return _int_list
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (str,):
        return _text_list
    if annotation is dict or typing.get_origin(annotation) is dict:
        return _json_object
    if annotation in (int, str):
        return annotation
    raise TypeError(f"no command-line type for an option annotated {annotation!r}")


def add_option_arguments(parser: argparse.ArgumentParser, cls, descriptions: dict[str, str]) -> dict[str, object]:
    """One argument per field of option set ``cls``: a positional for a field without a default, else
    ``--<field-with-dashes>``; help, ``metavar`` and ``group`` from the field's metadata (the groups of
    ``descriptions`` first, in its order and described by it, then the others in order of first use); the type
    from the annotation (:func:`_argument_type`). A bool field is a switch: ``--name`` when its default is
    False, ``--name``/``--no-name`` when it is True. Values are only
    converted here: ``cls`` checks them (once, naming the flag). Returns the argument groups by name."""
    hints = typing.get_type_hints(cls)
    groups = {name: parser.add_argument_group(name, description) for name, description in descriptions.items()}
    for f in fields(cls):
        meta = f.metadata
        if "group" in meta and meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"], descriptions.get(meta["group"]))
        where = groups.get(meta.get("group"), parser)
        help_text = meta["help"].replace("%", "%%")
        if f.default is MISSING and f.default_factory is MISSING:
            where.add_argument(f.name, metavar=meta.get("metavar"), help=help_text)
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            if default:
                where.add_argument(
                    flag, dest=f.name, action=argparse.BooleanOptionalAction, default=True, help=help_text
                )
            else:
                where.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        if default is not None:
            help_text += f" (default: {default})"
        where.add_argument(
            flag,
            dest=f.name,
            type=_argument_type(hints[f.name]),
            default=default,
            metavar=meta.get("metavar"),
            help=help_text,
        )
    return groups


class _OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (and, through ``parser_class``, its subcommands) whose errors are one line on
    stderr and exit 2, without the usage (``--help`` prints it)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default_probe_dir(model: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model.rstrip("/\\")).name or model)
    return f"nerve_probe_{name.strip('._') or 'model'}"


def build_parser() -> argparse.ArgumentParser:
    from nerve_hf.data import DEFAULT_CORPUS
    from nerve_hf.probe import ProbeConfig
    from nerve_hf.probe.config import IMAGE_INPUT, MEASUREMENT, TEXT_INPUT

    parser = _OneLineParser(
        prog="nerve",
        description="NerVE: eigenspectrum metrics (SE, PR, EEE, JS) of transformer feed-forward networks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{probe,report}")
    sub.required = True

    probe = sub.add_parser(
        "probe",
        help="measure every FFN of a pretrained checkpoint on a fixed input",
        description="Measure the pre/post-activation eigenspectra of every FFN of MODEL and write report.json, "
        "report.csv, eigenvalues.npz and plots to --out.",
        epilog="examples:\n  nerve probe gpt2\n  nerve probe ./my-gpt2 --text-file notes.txt --max-tokens 4096\n"
        "  nerve probe out/run --eval-loss     (every out/run/checkpoint-N, in step order)\n"
        "  nerve probe EleutherAI/pythia-70m --revision step1000,step2000,step4000\n"
        "  nerve probe timm/mixer_b16_224.goog_in21k_ft_in1k --image-dir photos/\n"
        "  nerve probe mixer.pth --timm-arch mixer_s16_224",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    groups = add_option_arguments(
        probe,
        ProbeConfig,
        {
            TEXT_INPUT: f"transformers models; default: the embedded {DEFAULT_CORPUS} corpus",
            IMAGE_INPUT: "timm models; default: the embedded scikit-learn digits",
            MEASUREMENT: None,
        },
    )
    model = next(action for action in probe._actions if action.dest == "model")
    model.nargs = "+"  # several MODELs (or a run directory, or several --revision values): a checkpoint series
    model.help = (
        model.help + "; several MODELs, a run directory of checkpoint-N folders or several --revision values "
        "probe a checkpoint series on the same tokens (series.csv, series.json, spectra/, trajectory plots)"
    )
    run = groups[MEASUREMENT]  # the options of the command alone, not of a probe
    run.add_argument("--out", metavar="DIR", help="output folder (default: ./nerve_probe_<model name>)")
    run.add_argument("--no-plots", action="store_true", help="write report.json/csv and eigenvalues.npz only")
    run.add_argument(
        "--no-series",
        action="store_true",
        help="probe MODEL as one model even when it is a run directory holding checkpoint-N folders "
        "(the final model the Trainer saved there)",
    )
    run.add_argument(
        "--eval-loss",
        action="store_true",
        help="also the mean token loss of a causal LM on the same tokens (labels = input_ids, pads excluded); "
        "for a series, Pearson r of each metric with it (series_correlations.csv)",
    )

    report = sub.add_parser(
        "report",
        help="correlate a training run's NerVE metrics with its loss; write plots",
        description="Read RUN_DIR/nerve_metrics.jsonl and trainer_state.json, align every measurement with the "
        "loss of the same step, and write correlations.csv, summary.md and plots.",
    )
    report.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        nargs="+",
        help="the Trainer's output_dir of a run with NerveCallback; several (or a model-zoo result file "
        "benchmarks/results/<preset>/<experiment>.json, several runs each) are compared: compare.csv and "
        "compare_<split>.png overlaying their trajectories",
    )
    report.add_argument(
        "--out", metavar="DIR", help="output folder (default: RUN_DIR/nerve_report; ./nerve_compare for several)"
    )
    report.add_argument(
        "--min-points", type=int, default=3, help="fewest aligned (metric, loss) pairs for a correlation (default: 3)"
    )
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal for our progress bar, table and errors: no load-time notices or bars."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # offline: no "Retrying in 8s" lines before our one-line error
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _probe(args: argparse.Namespace) -> int:
    from nerve_hf.probe.series import is_series
    from nerve_hf.sinks.files import check_writable_dir

    models = list(args.model)
    series = is_series(models, args.revision) and not (args.no_series and len(models) == 1)
    default_out = _default_probe_dir(models[0]) + ("_series" if series and len(models) > 1 else "")
    # First of all: an unusable --out must not cost a model load and a measurement.
    out = check_writable_dir(args.out or default_out, "--out" if args.out else "the default --out")
    from nerve_hf.probe import ProbeConfig, format_table, run_probe, write_probe

    values = {f.name: getattr(args, f.name) for f in fields(ProbeConfig)}
    config = ProbeConfig(**dict(values, model=models[0]))
    _quiet_libraries()
    if series:
        return _probe_series(config, models, out, args)
    result = run_probe(config, eval_loss=args.eval_loss)
    written = write_probe(result, out, config.spectra_layers, with_plots=not args.no_plots)
    data = result.data
    amount = f"{data.get('tokens')} tokens" if data.get("kind") == "text" else f"{data.get('images')} images"
    print(f"{result.model.get('class')} ({result.model.get('name')}) on {amount} of {data.get('source')}")
    print(format_table(result.report))
    if result.loss is not None:
        print(f"mean token loss: {result.loss:.4f}")
    print(f"wrote {len(written)} files to {out}/: {', '.join(p.name for p in written)}")
    return 0


def _probe_series(config, models: list[str], out: Path, args: argparse.Namespace) -> int:
    from nerve_hf.probe.series import expand_series, run_dir_note, run_series, write_series
    from nerve_hf.probe.tables import means_per_checkpoint

    checkpoints = expand_series(models, config.revision)
    for note in filter(None, map(run_dir_note, models)):
        print(note)
    if args.eval_loss and len(checkpoints) < 3:
        print(f"{len(checkpoints)} checkpoints: Pearson r needs at least 3 points, so series_correlations.csv is blank")
    result = run_series(config, checkpoints, eval_loss=args.eval_loss)
    written = write_series(result, out, with_plots=not args.no_plots)
    data = result.data
    amount = f"{data.get('tokens')} tokens" if data.get("kind") == "text" else f"{data.get('images')} images"
    print(
        f"{len(checkpoints)} checkpoints of {result.results[0].model.get('class')} on {amount} of {data.get('source')}"
    )
    rows = [(c.name, c.step, probe.report, probe.loss) for c, probe in zip(checkpoints, result.results)]
    print("layer means per checkpoint (one line per family of sites, never two averaged together):")
    print(means_per_checkpoint(rows, with_loss=bool(result.eval_loss)))
    files = sorted(
        {str(p.relative_to(out).parts[0]) + ("/" if len(p.relative_to(out).parts) > 1 else "") for p in written}
    )
    print(f"wrote {len(written)} files to {out}/: {', '.join(files)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from nerve_hf.analysis.report import write_report
    from nerve_hf.analysis.trend import FEW_POINTS
    from nerve_hf.sinks.files import check_writable_dir

    if args.out is not None:
        check_writable_dir(args.out)  # before reading the run; write_report checks its default folder itself
    first = Path(args.run_dir[0])
    if len(args.run_dir) > 1 or (first.suffix == ".json" and first.name != "trainer_state.json"):  # a result file
        return _compare(args)
    result = write_report(args.run_dir[0], args.out, min_points=args.min_points)
    corr = result.correlations
    mean = corr[corr["site"] == "mean"]
    print(f"Pearson r of the layer-mean metrics with the loss of the same step ({result.run.run_dir}):")
    for split in dict.fromkeys(mean["split"]):
        part = mean[mean["split"] == split]
        cells = "  ".join(
            f"{row.metric}={row.r:+.3f}" if row.r == row.r else f"{row.metric}=nan" for row in part.itertuples()
        )
        n = int(part["n"].max())
        print(f"  {split} (n={n}): {cells}")
        changes = "  ".join(
            f"{row.metric}={row.r_diff:+.3f}" if row.r_diff == row.r_diff else f"{row.metric}=nan"
            for row in part.itertuples()
        )
        print(f"  {split} r of step-to-step changes, trend removed (n={n - 1 if n else 0}): {changes}")
        if bool(part["few_points"].any()):
            print(f"  {split}: r from fewer than {FEW_POINTS} points; read it as a trend, not as evidence")
    print(f"wrote {len(result.files)} files to {result.out_dir}/: {', '.join(p.name for p in result.files)}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from nerve_hf.analysis.compare import write_compare
    from nerve_hf.analysis.runs import split_order as _split_order

    result = write_compare(args.run_dir, args.out if args.out is not None else "nerve_compare")
    table = result.table
    print(f"compared {len(result.runs)} runs: {', '.join(result.runs)}")
    for name, frame in result.runs.items():
        mean = frame[frame["site"] == "mean"]
        for split in _split_order(mean["split"]):
            last = mean[mean["split"] == split].sort_values("step").iloc[-1]
            print(f"  {name} {split} step {int(last['step'])}: pr_pre={last['pr_pre']:.3f} se_pre={last['se_pre']:.3f}")
    print(
        f"wrote {len(result.files)} files to {result.out_dir}/ ({len(table)} rows in compare.csv): "
        f"{', '.join(p.name for p in result.files)}"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``nerve`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from nerve_hf.errors import InputError, MissingExtraError, one_line

    try:
        return _probe(args) if args.command == "probe" else _report(args)
    except (InputError, MissingExtraError) as error:
        print(f"nerve {args.command}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"nerve {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
