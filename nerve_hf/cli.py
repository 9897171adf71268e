"""The ``nerve`` command: ``nerve probe MODEL`` and ``nerve report RUN_DIR``.

Bad input (a path that is not a model, an unsupported architecture, an empty text file, an output folder
that cannot be written, ...) ends with one line on stderr and exit status 2, never a traceback; an unusable
``--out`` is reported before anything is loaded or measured. Heavy libraries load only once a subcommand
runs, so ``nerve --help`` is quick.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]

EXIT_INPUT = 2  # bad input the user can fix
EXIT_INTERRUPTED = 130


def _int_list(text: str) -> list[int]:
    """``"0,3,-1"`` -> ``[0, 3, -1]``."""
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,5,-1; got {text!r}") from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"num_blocks\": 2}}'; got {text!r}")
    return value


def _default_probe_dir(model: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model.rstrip("/\\")).name or model)
    return f"nerve_probe_{name.strip('._') or 'model'}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nerve",
        description="NerVE: eigenspectrum metrics (SE, PR, EEE, JS) of transformer feed-forward networks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{probe,report}")
    sub.required = True

    probe = sub.add_parser(
        "probe", help="measure every FFN of a pretrained checkpoint on a fixed input",
        description="Measure the pre/post-activation eigenspectra of every FFN of MODEL and write report.json, "
                    "report.csv, eigenvalues.npz and plots to --out.",
        epilog="examples:\n  nerve probe gpt2\n  nerve probe ./my-gpt2 --text-file notes.txt --max-tokens 4096\n"
               "  nerve probe timm/mixer_b16_224.goog_in21k_ft_in1k --image-dir photos/\n"
               "  nerve probe mixer.pth --timm-arch mixer_s16_224",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    probe.add_argument("model", metavar="MODEL",
                       help="local model folder (transformers save_pretrained or timm), a Hugging Face Hub id, "
                            "timm/<name> for a timm Hub model, or a timm checkpoint file/folder with --timm-arch")
    text = probe.add_argument_group("text input (transformers models; default: the embedded stdlib-code corpus)")
    text.add_argument("--text-file", metavar="FILE", help="measure on this UTF-8 text file")
    text.add_argument("--dataset", metavar="NAME",
                      help="embedded corpus (stdlib-code), a local dataset folder, or a Hub dataset id (streamed)")
    text.add_argument("--dataset-config", metavar="NAME", help="configuration of --dataset (e.g. en for allenai/c4)")
    text.add_argument("--dataset-split", default="train", metavar="SPLIT", help="split of --dataset (default: train)")
    text.add_argument("--text-column", metavar="COLUMN",
                      help="column of --dataset holding the text (default: text, content, code, or the first string column)")
    text.add_argument("--tokenizer", metavar="NAME_OR_PATH", help="tokenizer to use instead of the model's own")
    text.add_argument("--seq-len", type=int, default=256,
                      help="tokens per sequence, special tokens included; capped at the model's maximum (default: 256)")
    images = probe.add_argument_group("image input (timm models; default: the embedded scikit-learn digits)")
    images.add_argument("--image-dir", metavar="DIR", help="folder of images (searched recursively, sorted by name)")
    images.add_argument("--num-images", type=int, default=64, help="number of images to measure (default: 64)")
    images.add_argument("--timm-arch", metavar="NAME",
                        help="timm architecture of a local checkpoint without config.json: a registry name (mixer_b16_224) or a "
                             "class path (timm.models.mlp_mixer.MlpMixer) for custom sizes given by --timm-kwargs")
    images.add_argument("--timm-kwargs", type=_json_object, metavar="JSON",
                        help="extra timm.create_model arguments as a JSON object, e.g. '{\"num_blocks\": 4}'")
    run = probe.add_argument_group("measurement")
    run.add_argument("--max-tokens", type=int, default=16384,
                     help="per FFN, measure at most this many tokens (rows); the input is cut to it (default: 16384)")
    run.add_argument("--batch-size", type=int, default=8, help="sequences or images per forward pass (default: 8)")
    run.add_argument("--layers", type=_int_list, metavar="I,J,...",
                     help="block indices to measure, negative from the end (default: all)")
    run.add_argument("--spectra-layers", type=_int_list, metavar="I,J,...",
                     help="layers whose eigenvalue spectra are plotted (default: first, middle, last)")
    run.add_argument("--device", help="torch device (default: cuda when present, else cpu)")
    run.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "auto"),
                     help="weights and activations dtype; auto keeps the checkpoint's (default: float32)")
    run.add_argument("--revision", help="Hub revision (branch, tag or commit) of a transformers model")
    run.add_argument("--trust-remote-code", action="store_true",
                     help="allow transformers to run modelling code shipped with the checkpoint")
    run.add_argument("--out", metavar="DIR", help="output folder (default: ./nerve_probe_<model name>)")
    run.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    run.add_argument("--no-plots", action="store_true", help="write report.json/csv and eigenvalues.npz only")

    report = sub.add_parser(
        "report", help="correlate a training run's NerVE metrics with its loss; write plots",
        description="Read RUN_DIR/nerve_metrics.jsonl and trainer_state.json, align every measurement with the "
                    "loss of the same step, and write correlations.csv, summary.md and plots.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the Trainer's output_dir of a run with NerveCallback")
    report.add_argument("--out", metavar="DIR", help="output folder (default: RUN_DIR/nerve_report)")
    report.add_argument("--min-points", type=int, default=3,
                        help="fewest aligned (metric, loss) pairs for a correlation (default: 3)")
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
    from .outputs import check_writable_dir

    # First of all: an unusable --out must not cost a model load and a measurement.
    out = check_writable_dir(args.out or _default_probe_dir(args.model), "--out" if args.out else "the default --out")
    from .probe import ProbeConfig, format_table, run_probe, write_probe

    config = ProbeConfig(
        model=args.model, text_file=args.text_file, dataset=args.dataset, dataset_config=args.dataset_config,
        dataset_split=args.dataset_split, text_column=args.text_column, image_dir=args.image_dir,
        num_images=args.num_images, tokenizer=args.tokenizer, timm_arch=args.timm_arch,
        timm_kwargs=args.timm_kwargs, revision=args.revision, trust_remote_code=args.trust_remote_code,
        max_tokens=args.max_tokens, seq_len=args.seq_len, batch_size=args.batch_size, layers=args.layers,
        device=args.device, dtype=args.dtype, spectra_layers=args.spectra_layers, progress=not args.no_progress,
    )
    _quiet_libraries()
    result = run_probe(config)
    written = write_probe(result, out, args.spectra_layers, with_plots=not args.no_plots)
    data = result.data
    amount = f"{data.get('tokens')} tokens" if data.get("kind") == "text" else f"{data.get('images')} images"
    print(f"{result.model.get('class')} ({result.model.get('name')}) on {amount} of {data.get('source')}")
    print(format_table(result.report))
    print(f"wrote {len(written)} files to {out}/: {', '.join(p.name for p in written)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .outputs import check_writable_dir
    from .report import write_report

    if args.out is not None:
        check_writable_dir(args.out)  # before reading the run; write_report checks its default folder itself
    result = write_report(args.run_dir, args.out, min_points=args.min_points)
    corr = result.correlations
    mean = corr[corr["site"] == "mean"]
    print(f"Pearson r of the layer-mean metrics with the loss of the same step ({result.run.run_dir}):")
    for split in dict.fromkeys(mean["split"]):
        part = mean[mean["split"] == split]
        cells = "  ".join(f"{row.metric}={row.r:+.3f}" if row.r == row.r else f"{row.metric}=nan"
                          for row in part.itertuples())
        print(f"  {split} (n={int(part['n'].max())}): {cells}")
    print(f"wrote {len(result.files)} files to {result.out_dir}/: {', '.join(p.name for p in result.files)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``nerve`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import InputError

    try:
        return _probe(args) if args.command == "probe" else _report(args)
    except InputError as error:
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"nerve {args.command}: error: {message}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"nerve {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
