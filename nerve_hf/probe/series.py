"""``nerve probe`` over a checkpoint series: several checkpoints of one model, measured on the same tokens.

A series is given as

* a run directory: a folder holding ``checkpoint-N`` folders (the Trainer's ``output_dir``), probed in step
  order; the final model the Trainer saves beside them (its ``config.json``) is not part of the series
  (:func:`run_dir_note` says so; ``nerve probe RUN_DIR --no-series`` probes it alone);
* several MODEL paths or Hub ids (``nerve probe A B C``), in the order given;
* one Hub id with several revisions (``--revision step1000,step2000``, Pythia's convention).

The batches are built once, with the first checkpoint's tokenizer (or image transform), and every
checkpoint is measured on them; a later checkpoint whose tokenizer or architecture differs is refused
("mixed architectures in one series"). Each checkpoint's step is N of ``checkpoint-N`` or of a ``stepN``
revision or folder name, else its position in the series (0, 1, ...).

:func:`write_series` writes ``series.csv`` / ``series.json`` (one row per checkpoint and FFN site, with
``checkpoint`` and ``step`` columns, ``expert`` for MoE models, and ``loss`` with ``eval_loss``; MoE
checkpoints' routing statistics in ``series.json``, their per-layer summaries over experts in
``series_experts.png``), ``spectra/<checkpoint>.npz`` (the
keys of :func:`nerve_hf.sinks.archive.spectra_npz`), ``series_correlations.csv`` (Pearson r of each
metric with the loss, per layer and for the layer mean) and the trajectory plots.
"""

from __future__ import annotations

import datetime as _datetime
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from nerve_hf.errors import InputError, requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.probe.inputs import check_inputs, make_batches
from nerve_hf.probe.measure import load_checkpoint, measure_checkpoint, probe_settings
from nerve_hf.probe.models import check_device, classify, default_device
from nerve_hf.probe.result import ProbeResult, environment

__all__ = [
    "Checkpoint",
    "SeriesResult",
    "is_run_dir",
    "run_dir_note",
    "parse_step",
    "expand_series",
    "is_series",
    "run_series",
    "write_series",
    "series_frame",
]

SPLIT = "series"  # the split name of a series in the frames shared with nerve_hf.analysis.runs and run_plots
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_STEP = re.compile(r"^(?:.*[-_/])?step[-_]?(\d+)$", re.IGNORECASE)


@dataclass
class Checkpoint:
    """One member of a series: what to load (``spec`` at ``revision``), its name and its step."""

    spec: str
    revision: Optional[str]
    name: str
    step: int


def parse_step(name: str) -> Optional[int]:
    """N of ``checkpoint-N`` or of ``stepN`` (``step-N``, ``step_N``, ``.../stepN``); else None."""
    match = _CHECKPOINT.match(name) or _STEP.match(name)
    return int(match.group(1)) if match else None


def _checkpoint_dirs(folder: Path) -> list[Path]:
    found = [p for p in folder.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.match(p.name).group(1)))


def is_run_dir(spec: str) -> bool:
    """A folder that holds ``checkpoint-N`` folders (with or without a final model of its own)."""
    path = Path(spec).expanduser()
    return path.is_dir() and bool(_checkpoint_dirs(path))


def run_dir_note(spec: str) -> Optional[str]:
    """What ``nerve probe`` takes from run directory ``spec``, when it also holds a final model (None if not).

    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> for name in ("checkpoint-50", "checkpoint-100"): (run / name).mkdir()
    >>> (run / "config.json").write_text("{}") and None
    >>> note = run_dir_note(str(run)).replace(str(run), "RUN")
    >>> note.split(": ")[0]
    'RUN holds 2 checkpoints (checkpoint-50 ... checkpoint-100) and a final model (config.json)'
    >>> note.split("; ")[1]
    'the final model alone: nerve probe RUN --no-series'
    """
    path = Path(spec).expanduser()
    dirs = _checkpoint_dirs(path) if path.is_dir() else []
    if not dirs or not (path / "config.json").is_file():
        return None
    return (
        f"{spec} holds {len(dirs)} checkpoints ({dirs[0].name} ... {dirs[-1].name}) and a final model "
        f"(config.json): probing the {len(dirs)} checkpoints as a series, without the final model; "
        f"the final model alone: nerve probe {spec} --no-series"
    )


def is_series(models: Sequence[str], revisions: Optional[Sequence[str]]) -> bool:
    """Whether MODEL(s) and ``--revision`` make a series (else: one checkpoint, probed as always)."""
    return len(models) > 1 or len(revisions or ()) > 1 or any(is_run_dir(m) for m in models)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip("._") or "checkpoint"


def expand_series(models: Sequence[str], revisions: Optional[Sequence[str]] = None) -> list[Checkpoint]:
    """The checkpoints of MODEL(s) and ``revisions``; InputError when they make no series."""
    if not models:
        raise InputError("give at least one MODEL")
    revisions = list(revisions or [])
    if len(revisions) > 1 and len(models) > 1:
        raise InputError("several --revision values need exactly one MODEL (a Hub id)")
    if len(revisions) > 1 and Path(models[0]).expanduser().exists():
        raise InputError(f"--revision is for a Hub id; {models[0]!r} is a local path")
    found: list[tuple[str, Optional[str], str, Optional[int]]] = []
    if len(revisions) > 1:
        found = [(models[0], rev, rev, parse_step(rev)) for rev in revisions]
    else:
        revision = revisions[0] if revisions else None
        for spec in models:
            path = Path(spec).expanduser()
            dirs = _checkpoint_dirs(path) if path.is_dir() else []
            if dirs or (path.is_dir() and not (path / "config.json").is_file()):
                if not dirs:
                    raise InputError(
                        f"{spec!r} is a folder without config.json and without checkpoint-N folders: "
                        f"neither a model nor a run directory"
                    )
                found += [(str(d), revision, d.name, parse_step(d.name)) for d in dirs]
            else:
                name = path.name if path.exists() else spec
                found.append((spec, revision, name, parse_step(Path(spec.rstrip("/")).name)))
    checkpoints, names = [], set()
    for position, (spec, revision, name, step) in enumerate(found):
        name = _safe(name)
        unique, n = name, 2
        while unique in names:
            unique, n = f"{name}-{n}", n + 1
        names.add(unique)
        checkpoints.append(Checkpoint(spec, revision, unique, position if step is None else step))
    return checkpoints


@dataclass
class SeriesResult:
    """A probed series: one :class:`nerve_hf.probe.ProbeResult` per checkpoint, in series order."""

    checkpoints: list[Checkpoint]
    results: list = field(default_factory=list)  # ProbeResult
    data: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def eval_loss(self) -> bool:
        return any(result.loss is not None for result in self.results)


def _architecture(loaded) -> dict:
    """What must agree between the checkpoints of a series: model class and parameter shapes."""
    return {
        "class": type(loaded.model).__name__,
        "shapes": {name: tuple(p.shape) for name, p in loaded.model.named_parameters()},
    }


def _tokenizer_identity(loaded):
    tokenizer = loaded.tokenizer
    if tokenizer is None:
        return None
    return (
        type(tokenizer).__name__,
        tuple(sorted(tokenizer.get_vocab().items())),
        tuple(tokenizer.all_special_ids),
    )


def run_series(
    config, checkpoints: Sequence[Checkpoint], *, eval_loss: bool = False, progress: Optional[bool] = None
) -> SeriesResult:
    """Measure every checkpoint on the batches built from the first one; InputError for bad input."""
    if not checkpoints:
        raise InputError("the series has no checkpoints")
    show = config.progress if progress is None else progress
    first = checkpoints[0]
    source = classify(first.spec, config.timm_arch)
    file_text = check_inputs(config, source.modality)
    device = check_device(config.device or default_device())
    out = SeriesResult(checkpoints=list(checkpoints))
    reference = None
    batches = seq_len = None
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(checkpoints), desc="nerve probe", unit="checkpoint", file=sys.stderr)
    try:
        for index, checkpoint in enumerate(checkpoints):
            if bar is not None:
                bar.set_description(f"checkpoint {index + 1} of {len(checkpoints)}")
            loaded, adapter, _ = load_checkpoint(config, checkpoint.spec, checkpoint.revision)
            identity = (_architecture(loaded), _tokenizer_identity(loaded))
            if reference is None:
                reference = identity
                seq_len = min(config.seq_len, loaded.max_length) if loaded.max_length else config.seq_len
                batches, out.data = make_batches(config, loaded, seq_len, file_text)
            elif identity != reference:
                what = "architecture" if identity[0] != reference[0] else "tokenizer"
                raise InputError(
                    f"mixed architectures in one series: the {what} of {checkpoint.name!r} differs from that "
                    f"of {first.name!r}"
                )
            report, loss = measure_checkpoint(
                config, checkpoint.spec, loaded, adapter, batches, device, eval_loss=eval_loss, progress=False
            )
            settings = probe_settings(config, device, seq_len, loaded.model, out.data)
            out.results.append(
                ProbeResult(report=report, model=loaded.provenance, data=out.data, settings=settings, loss=loss)
            )
            out.settings = settings
            del loaded, adapter
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    out.settings = dict(out.settings, revision=[c.revision for c in checkpoints] if len(checkpoints) else None)
    return out


def series_frame(result: SeriesResult):
    """One row per checkpoint and FFN site: checkpoint, step, the row keys and (with a loss) ``loss``."""
    with requires("probe"):
        import pandas as pd

    from nerve_hf.report import ROW_KEYS

    rows = []
    has_experts = any("expert" in row for probe in result.results for row in probe.report.rows)
    keys = [*ROW_KEYS, "expert"] if has_experts else list(ROW_KEYS)  # MoE: each routed expert's index
    for checkpoint, probe in zip(result.checkpoints, result.results):
        for row in probe.report.rows:
            extra = {"loss": probe.loss} if result.eval_loss else {}
            rows.append(
                {"checkpoint": checkpoint.name, "step": checkpoint.step, **{k: row.get(k) for k in keys}, **extra}
            )
    columns = ["checkpoint", "step", *keys] + (["loss"] if result.eval_loss else [])
    return pd.DataFrame(rows, columns=columns)


def _run_frames(frame):
    """``(metrics, losses)`` in the shape of :class:`nerve_hf.analysis.runs.RunData` (split ``series``, with the
    layer-mean rows), for the shared plots and correlations."""
    with requires("probe"):
        import pandas as pd

    from nerve_hf.report import ROW_KEYS

    columns = ["step", "split", *ROW_KEYS]
    metrics = frame.assign(split=SPLIT)[columns]
    # the layer means are over the dense FFNs only, one per family, as the report's nerve/mean keys are
    from nerve_hf.analysis.runs import family_means

    mean = family_means(metrics[metrics["kind"] == "dense"], ["split", "step"], list(METRIC_NAMES))
    metrics = pd.concat([metrics, mean[columns]], ignore_index=True)
    metrics = metrics.sort_values(["step", "layer", "site"], kind="stable").reset_index(drop=True)
    losses = None
    if "loss" in frame:
        losses = frame.drop_duplicates("step")[["step", "loss"]].assign(split=SPLIT)[["step", "split", "loss"]]
    return metrics, losses


def series_correlations(result: SeriesResult, min_points: int = 3):
    """Pearson r (scipy) of each metric with the loss across the checkpoints: site (``mean`` first, then
    per layer), metric, r, p, n."""
    from nerve_hf.analysis.correlations import correlations

    metrics, losses = _run_frames(series_frame(result))
    table = metrics.merge(losses, on=["split", "step"], how="inner")
    return correlations(table, min_points).drop(columns="split")


def write_series(result: SeriesResult, out_dir, with_plots: bool = True) -> list[Path]:
    """Write the series' table, spectra, correlations (with a loss) and plots into ``out_dir``."""
    import numpy as np

    from nerve_hf.analysis import expert_plots
    from nerve_hf.analysis import run_plots as plots
    from nerve_hf.sinks.archive import spectra_npz
    from nerve_hf.sinks.files import write_bytes, write_csv, write_figure, write_json

    out_dir = Path(out_dir)
    frame = series_frame(result)
    written = [write_csv(out_dir / "series.csv", frame)]
    content = {
        "checkpoints": [
            {
                "checkpoint": checkpoint.name,
                "step": checkpoint.step,
                "spec": checkpoint.spec,
                "revision": checkpoint.revision,
                "loss": probe.loss,
                "mean": probe.report.mean_summary(),
                "rows": probe.report.rows,
                **({"routing": probe.report.routing} if probe.report.routing else {}),  # MoE models
                "model": probe.model,
            }
            for checkpoint, probe in zip(result.checkpoints, result.results)
        ],
        "data": result.data,
        "settings": result.settings,
        "environment": environment(),
        "created": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "metrics": list(METRIC_NAMES),
        "loss": "mean next-token cross-entropy over the real tokens (labels = input_ids, pads excluded)"
        if result.eval_loss
        else None,
    }
    written.append(write_json(out_dir / "series.json", content))
    for checkpoint, probe in zip(result.checkpoints, result.results):
        if probe.report.eigenvalues:
            report = probe.report  # the archive's keys: pre/post, and the flow's and buckets' when measured
            data = spectra_npz(report.eigenvalues, np.float64, report.flow_eigenvalues, report.position_eigenvalues)
            written.append(write_bytes(out_dir / "spectra" / f"{checkpoint.name}.npz", data))
    if result.eval_loss:
        written.append(write_csv(out_dir / "series_correlations.csv", series_correlations(result)))
    if not with_plots:
        return written
    metrics, losses = _run_frames(frame)
    metrics = expert_plots.collapse_experts(metrics)  # MoE: a line per layer (its experts' token-weighted mean)
    title = f"NerVE metrics per layer over {len(result.checkpoints)} checkpoints"
    written.append(
        write_figure(out_dir / "series_trajectories.png", plots.plot_trajectories(metrics, SPLIT, losses, title=title))
    )
    written.append(write_figure(out_dir / "series_heatmaps.png", plots.plot_heatmaps(metrics, SPLIT)))
    if "expert" in frame:  # MoE: per-layer summaries over the checkpoints
        summaries = expert_plots.layer_summaries(frame.assign(split=SPLIT).to_dict("records"), SPLIT)
        figure = expert_plots.plot_expert_summaries(summaries, SPLIT)
        written.append(write_figure(out_dir / "series_experts.png", figure))
    return written
