"""Run analysis behind ``nerve report``: a training run's NerVE metrics next to its loss: correlations,
summary, plots.

A run directory is what ``Trainer`` + :class:`nerve_hf.NerveCallback` leave behind: the callback's
``nerve_metrics.jsonl`` and the Trainer's ``trainer_state.json`` (``log_history``). Each measurement is
aligned with the loss logged at the same step of the same split:

* ``train`` spectra (the micro-batches of optimizer step k) with the training ``loss`` logged at step k
  (the Trainer's running mean since its previous log);
* ``eval`` spectra with ``eval_loss`` of the same evaluation (``eval_<name>`` with ``eval_<name>_loss``).

Notebook use::

    from nerve_hf.analysis import runs
    run = runs.load_run("out/run")            # run.metrics, run.losses: DataFrames
    table = runs.aligned(run)                 # one row per (split, step, site) with its loss
    corr = runs.correlations(table)           # split, site, metric, r, p, n
    runs.plots.plot_trajectories(run.metrics, "train", run.losses)
    runs.write_report("out/run")              # correlations.csv, summary.md, PNGs
    runs.write_compare(["out/a", "out/b"], "cmp")  # compare.csv, compare_<split>.png: runs overlaid
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from nerve_hf.analysis import plots
from nerve_hf.errors import InputError
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.report import ROW_KEYS
from nerve_hf.sinks.archive import load_spectra
from nerve_hf.sinks.records import RECORDS_FILENAME, scan_records, skipped_lines_message
from nerve_hf.sites import layer_of

__all__ = [
    "MIN_POINTS",
    "RunData",
    "load_run",
    "aligned",
    "correlations",
    "summary_markdown",
    "write_report",
    "ReportResult",
    "plots",
    "COMPARE_COLUMNS",
    "CompareResult",
    "load_compare_inputs",
    "compare_table",
    "write_compare",
]

MIN_POINTS = 3  # a Pearson correlation needs at least this many (metric, loss) pairs
STATE_FILENAME = "trainer_state.json"
CORRELATION_COLUMNS = ["split", "site", "metric", "r", "p", "n"]
_EVAL_LOSS = re.compile(r"^(eval(?:_.+)?)_loss$")  # eval_loss -> eval; eval_code_loss -> eval_code
_LOG_KEY = re.compile(r"^(?:(eval(?:_.+)?)_)?nerve/(.+)/([a-z_]+)$")  # [eval_]nerve/<site>/<metric>


@dataclass
class RunData:
    """A run's measurements and losses as long DataFrames.

    ``metrics``: step, split, site, layer, dim, tokens and the seven metrics; one row per FFN site per
    measurement plus a ``site == "mean"`` row per measurement (the average over sites with the metric
    defined, as logged under ``nerve/mean/...``; ``layer`` is -1, ``tokens`` the mean over sites). A
    measurement with site records missing (a crash during its write) is left out whole.
    ``losses``: step, split, loss.
    """

    run_dir: Path
    metrics: object  # pandas.DataFrame
    losses: object  # pandas.DataFrame
    sources: dict = field(default_factory=dict)  # which files the frames came from


def _state_file(run_dir: Path) -> Optional[Path]:
    """``trainer_state.json`` of the run: its own, else that of its newest checkpoint."""
    if (run_dir / STATE_FILENAME).is_file():
        return run_dir / STATE_FILENAME
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if (p / STATE_FILENAME).is_file() and p.name[11:].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name[11:])) / STATE_FILENAME if checkpoints else None


def _losses(log_history: list[dict]) -> list[dict]:
    out = []
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if not isinstance(value, (int, float)):
                continue
            if key == "loss":
                out.append({"step": int(step), "split": "train", "loss": float(value)})
            elif (match := _EVAL_LOSS.match(key)) and "nerve/" not in key:
                out.append({"step": int(step), "split": match.group(1), "loss": float(value)})
    return out


def _records_from_log_history(log_history: list[dict]) -> list[dict]:
    """Per-site records rebuilt from ``nerve/<site>/<metric>`` keys (runs without the JSONL file)."""
    grouped: dict[tuple, dict] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            match = _LOG_KEY.match(key)
            if step is None or not match or match.group(3) not in METRIC_NAMES or match.group(2) == "mean":
                continue
            split, site = match.group(1) or "train", match.group(2)
            record = grouped.setdefault(
                (int(step), split, site),
                {
                    "step": int(step),
                    "split": split,
                    "site": site,
                    "layer": layer_of(site),
                    "dim": math.nan,
                    "tokens": math.nan,
                },
            )
            record[match.group(3)] = math.nan if value is None else float(value)
    return list(grouped.values())


def _read_records_file(path: Path) -> list[dict]:
    """The records of ``path``, with read_records' warning about unreadable lines; InputError when the file
    is empty or holds no JSON record at all (then without the warning: the error says it all)."""
    scan = scan_records(path)
    if not scan.lines:
        raise InputError(f"records file {str(path)!r} is empty")
    if not scan.records:
        raise InputError(f"records file {str(path)!r} holds no JSON records (is it a NerVE records file?)")
    if scan.skipped:
        warnings.warn(skipped_lines_message(path, scan.skipped), RuntimeWarning, stacklevel=3)
    return scan.records


def _complete_steps(metrics, source: str):
    """``metrics`` without its incomplete (split, step) measurements, with one RuntimeWarning naming them.

    A measurement is complete when its number of distinct site records equals its records' ``sites``
    field; records without that field expect the largest number of sites any step of their split has.
    """
    counts = metrics.groupby(["split", "step"], sort=False).agg(found=("site", "nunique"), sites=("sites", "max"))
    largest = counts.groupby(level="split")["found"].transform("max")
    counts["expected"] = counts["sites"].fillna(largest).astype(int)
    incomplete = counts[counts["found"] != counts["expected"]]
    if not len(incomplete):
        return metrics
    warnings.warn(
        f"left out incomplete measurements of {source!r} (records missing after a crash): "
        f"{_describe_incomplete(incomplete)}",
        RuntimeWarning,
        stacklevel=3,
    )
    keys = metrics.set_index(["split", "step"]).index
    return metrics[~keys.isin(incomplete.index)]


def _describe_incomplete(incomplete) -> str:
    """``train step 30 (1 of 2 sites), eval steps 10, 20 (1 of 2 sites)``: splits in report order."""
    groups: dict[tuple, list[int]] = {}
    for (split, step), row in incomplete.iterrows():
        groups.setdefault((split, int(row["found"]), int(row["expected"])), []).append(int(step))
    order = {split: i for i, split in enumerate(_split_order(split for split, _, _ in groups))}
    parts = []
    for (split, found, expected), steps in sorted(groups.items(), key=lambda item: (order[item[0][0]], min(item[1]))):
        noun = "step" if len(steps) == 1 else "steps"
        parts.append(f"{split} {noun} {', '.join(map(str, sorted(steps)))} ({found} of {expected} sites)")
    return ", ".join(parts)


def load_run(run_dir) -> RunData:
    """Read a run directory (or one of its ``checkpoint-N`` folders); InputError if it is not one, or if its
    records file is empty or holds no JSON record. Unreadable record lines and incomplete measurements are
    left out, each kind with one RuntimeWarning."""
    import pandas as pd

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run directory {str(run_dir)!r} does not exist")
    state_path = _state_file(run_dir)
    if state_path is None:
        raise InputError(
            f"{str(run_dir)!r} has no {STATE_FILENAME} (nor a checkpoint-N/ with one): call trainer.save_state() "
            f"at the end of training, or point at the Trainer's output_dir"
        )
    try:
        log_history = json.loads(state_path.read_text(encoding="utf-8")).get("log_history", [])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
        raise InputError(f"{str(state_path)!r} is not a readable trainer state: {error}") from None

    records_path = run_dir / RECORDS_FILENAME
    last_step = None
    if (
        not records_path.is_file()
        and run_dir.name.startswith("checkpoint-")
        and (run_dir.parent / RECORDS_FILENAME).is_file()
    ):
        records_path = run_dir.parent / RECORDS_FILENAME  # a checkpoint folder: the run's records up to it
        last_step = max((int(e["step"]) for e in log_history if "step" in e), default=None)
    if records_path.is_file():
        records = _read_records_file(records_path)
        sources = {"records": str(records_path), "state": str(state_path)}
    else:
        records = _records_from_log_history(log_history)
        sources = {"records": f"{state_path} (nerve/ keys of log_history)", "state": str(state_path)}
    if last_step is not None:
        records = [r for r in records if int(r["step"]) <= last_step]
    if not records:
        raise InputError(
            f"{str(run_dir)!r} holds no NerVE measurements (no {RECORDS_FILENAME}, no nerve/ keys in "
            f"{STATE_FILENAME}): train with callbacks=[nerve_hf.NerveCallback(...)]"
        )

    columns = ["step", "split", *ROW_KEYS]
    metrics = pd.DataFrame(records).reindex(columns=[*columns, "sites"])
    metrics[list(METRIC_NAMES)] = metrics[list(METRIC_NAMES)].astype(float)
    # A resumed run may have measured a step twice: the last record wins.
    metrics = metrics.drop_duplicates(subset=["step", "split", "site"], keep="last")
    metrics = _complete_steps(metrics, sources["records"])[columns]
    if not len(metrics):
        raise InputError(
            f"every measurement in {sources['records']!r} is incomplete (records missing after a "
            f"crash): nothing to report"
        )
    mean = (
        metrics.groupby(["split", "step"], sort=False)
        .agg({**{name: "mean" for name in METRIC_NAMES}, "tokens": "mean"})
        .reset_index()
    )
    mean = mean.assign(site="mean", layer=-1, dim=math.nan)
    metrics = pd.concat([metrics, mean[columns]], ignore_index=True)
    metrics = metrics.sort_values(["split", "step", "layer", "site"], kind="stable").reset_index(drop=True)

    losses = pd.DataFrame(_losses(log_history), columns=["step", "split", "loss"])
    losses = losses.drop_duplicates(subset=["step", "split"], keep="last").sort_values(["split", "step"])
    return RunData(run_dir=run_dir, metrics=metrics, losses=losses.reset_index(drop=True), sources=sources)


def aligned(run: RunData):
    """Every measurement with the loss of the same split and step (measurements without one dropped).

    Columns: step, split, site, layer, dim, tokens, the seven metrics, loss.
    """
    return run.metrics.merge(run.losses, on=["split", "step"], how="inner")


def _split_order(splits) -> list[str]:
    return sorted(set(splits), key=lambda s: (s != "train", s != "eval", s))


def correlations(table, min_points: int = MIN_POINTS):
    """Pearson r (and its two-sided p) of each metric with the loss, per split and site.

    ``table``: :func:`aligned` rows (or a :class:`RunData`). Pairs where the metric or the loss is NaN
    are left out; ``n`` counts the pairs used. With fewer than ``min_points`` pairs, or a constant
    series, r and p are NaN. Rows: splits (train, eval, ...), sites (``mean`` first, then by layer),
    metrics in :data:`nerve_hf.metrics.METRIC_NAMES` order.
    """
    import numpy as np
    import pandas as pd
    from scipy import stats

    if isinstance(table, RunData):
        table = aligned(table)
    out = []
    for split in _split_order(table["split"]):
        part = table[table["split"] == split]
        sites = part[["site", "layer"]].drop_duplicates("site")
        sites = ["mean"] + [s for s in sites.sort_values("layer", kind="stable")["site"] if s != "mean"]
        for site in sites:
            rows = part[part["site"] == site].sort_values("step")
            for name in METRIC_NAMES:
                x, y = rows[name].to_numpy(float), rows["loss"].to_numpy(float)
                keep = np.isfinite(x) & np.isfinite(y)
                x, y = x[keep], y[keep]
                r = p = math.nan
                if len(x) >= min_points and np.ptp(x) > 0 and np.ptp(y) > 0:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # near-constant input: scipy warns, we report its value
                        result = stats.pearsonr(x, y)
                    r, p = float(result.statistic), float(result.pvalue)
                out.append({"split": split, "site": site, "metric": name, "r": r, "p": p, "n": int(len(x))})
    return pd.DataFrame(out, columns=CORRELATION_COLUMNS)


def _few_points_message(run: RunData, corr, min_points: int) -> str:
    counts = corr[corr["site"] == "mean"].groupby("split")["n"].max() if len(corr) else None
    measured = run.metrics[run.metrics["site"] == "mean"].groupby("split")["step"].nunique()
    parts = []
    for split in _split_order(measured.index):
        paired = int(counts.get(split, 0)) if counts is not None else 0
        parts.append(f"{split}: {measured[split]} measured, {paired} with a loss")
    return (
        f"too few measurements for a correlation in {str(run.run_dir)!r} ({'; '.join(parts)}); Pearson r needs at "
        f"least {min_points} steps with both a measurement and a loss: measure more often "
        f"(NerveCallback(every_n_steps=...), eval_steps) or train longer"
    )


def summary_markdown(run: RunData, corr, figures: dict[str, list[str]] | None = None) -> str:
    """``summary.md``: what was measured, the correlations of the layer mean, the strongest per-layer
    correlations, the last measurement per layer, and links to the figures."""
    lines = [f"# NerVE report: `{run.run_dir}`", ""]
    lines += [f"- measurements: `{run.sources.get('records')}`", f"- losses: `{run.sources.get('state')}`"]
    sites = run.metrics[run.metrics["site"] != "mean"]["site"].nunique()
    for split in _split_order(run.metrics["split"]):
        steps = sorted(run.metrics[run.metrics["split"] == split]["step"].unique())
        with_loss = len(set(steps) & set(run.losses[run.losses["split"] == split]["step"]))
        loss_name = "loss" if split == "train" else f"{split}_loss"
        lines.append(
            f"- `{split}`: {len(steps)} measurements of {sites} FFN sites, steps {steps[0]}..{steps[-1]}; "
            f"{with_loss} aligned with `{loss_name}` of the same step"
        )
    lines += [
        "",
        "Train spectra are paired with the training loss the Trainer logged at the same step (its running "
        "mean since the previous log); eval spectra with the eval loss of the same evaluation. Pearson r and "
        "two-sided p from `scipy.stats.pearsonr`; NaN where fewer than "
        f"{MIN_POINTS} pairs or a constant series.",
        "",
    ]

    for split in _split_order(corr["split"]):
        part = corr[(corr["split"] == split) & (corr["site"] == "mean")]
        lines += [f"## `{split}`: layer-mean metric vs loss", "", "| metric | r | p | n |", "|---|---:|---:|---:|"]
        lines += [
            f"| {row.metric} | {_num(row.r, '+.4f')} | {_num(row.p, '.2e')} | {row.n} |" for row in part.itertuples()
        ]
        layers = corr[(corr["split"] == split) & (corr["site"] != "mean")].dropna(subset=["r"])
        if len(layers):
            top = layers.reindex(layers["r"].abs().sort_values(ascending=False).index).head(5)
            lines += ["", "Strongest per-layer correlations:", "", "| site | metric | r | n |", "|---|---|---:|---:|"]
            lines += [f"| {row.site} | {row.metric} | {row.r:+.4f} | {row.n} |" for row in top.itertuples()]
        lines.append("")

    for split in _split_order(run.metrics["split"]):
        frame = run.metrics[run.metrics["split"] == split]
        last = frame[frame["step"] == frame["step"].max()]
        lines += [
            f"## `{split}`: last measurement (step {int(frame['step'].max())})",
            "",
            "| site | tokens | " + " | ".join(METRIC_NAMES) + " |",
            "|---|---:|" + "---:|" * len(METRIC_NAMES),
        ]
        for row in last.itertuples():
            tokens = "" if math.isnan(float(row.tokens)) else str(int(row.tokens))
            lines.append(
                f"| {row.site} | {tokens} | " + " | ".join(_num(getattr(row, n), ".4f") for n in METRIC_NAMES) + " |"
            )
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        for names in figures.values():
            lines += [f"![{name}]({name})" for name in names]
        lines.append("")
    return "\n".join(lines)


def _num(value, spec: str) -> str:
    return "nan" if value is None or math.isnan(float(value)) else format(float(value), spec)


@dataclass
class ReportResult:
    """What :func:`write_report` wrote."""

    out_dir: Path
    files: list[Path]
    correlations: object  # pandas.DataFrame
    run: RunData


def write_report(run_dir, out_dir=None, min_points: int = MIN_POINTS) -> ReportResult:
    """Write ``correlations.csv``, ``summary.md`` and the plots of a run into ``out_dir``
    (default ``<run_dir>/nerve_report``).

    Raises InputError, before writing anything, when the run is not a run, when no (split, site, metric)
    series has ``min_points`` aligned points, or when ``out_dir`` cannot be written. Each file is written
    atomically.
    """
    from nerve_hf.sinks.files import check_writable_dir, write_csv, write_figure, write_text

    if min_points < 2:
        raise InputError(
            f"--min-points must be at least 2 (a correlation of fewer points is undefined), got {min_points}"
        )
    run = load_run(run_dir)
    table = aligned(run)
    corr = correlations(table, min_points)
    if not len(corr) or int(corr["n"].max()) < min_points:
        raise InputError(_few_points_message(run, corr, min_points))

    if out_dir is not None:
        out_dir = check_writable_dir(out_dir)
    else:
        out_dir = check_writable_dir(
            run.run_dir / "nerve_report", "report folder", "pass --out with a folder you can write to"
        )
    files = [write_csv(out_dir / "correlations.csv", corr)]
    spectra = load_spectra(run.run_dir)  # the run's spectra archive (empty without one)
    figures: dict[str, list[str]] = {}
    for split in _split_order(run.metrics["split"]):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
        made = {
            f"trajectories_{safe}.png": plots.plot_trajectories(run.metrics, split, run.losses),
            f"heatmaps_{safe}.png": plots.plot_heatmaps(run.metrics, split),
        }
        if (table["split"] == split).any():
            made[f"scatter_{safe}.png"] = plots.plot_metric_vs_loss(table, corr, split)
        if split in set(spectra["split"]):
            made[f"spectra_{safe}.png"] = plots.plot_spectrum_evolution(spectra, split)
            made[f"cumulative_{safe}.png"] = plots.plot_spectrum_evolution(spectra, split, cumulative=True)
        for name, figure in made.items():
            files.append(write_figure(out_dir / name, figure))
        figures[split] = list(made)
    files.append(write_text(out_dir / "summary.md", summary_markdown(run, corr, figures)))
    return ReportResult(out_dir=out_dir, files=files, correlations=corr, run=run)


# ------------------------------------------------------------------------------------ comparing runs
COMPARE_COLUMNS = ["run", "split", "step", "site", "layer", "tokens", *METRIC_NAMES]


@dataclass
class CompareResult:
    """What :func:`write_compare` wrote: ``table`` is ``compare.csv`` (one row per run, split, step, site)."""

    out_dir: Path
    files: list[Path]
    table: object  # pandas.DataFrame
    runs: dict = field(default_factory=dict)  # run name -> metrics DataFrame (with the layer-mean rows)


def _zoo_runs(path: Path) -> dict:
    """The runs of a model-zoo result file (``benchmarks/results/<preset>/<experiment>.json``): name
    ``<experiment>/<run>`` -> metrics DataFrame (split ``eval``: the zoo measures on its eval batches)."""
    import pandas as pd

    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{str(path)!r} is not a readable JSON file: {error}") from None
    runs = content.get("runs") if isinstance(content, dict) else None
    if not isinstance(runs, dict) or not runs:
        raise InputError(f"{str(path)!r} is not a model-zoo result file (no 'runs' with NerVE series)")
    out = {}
    experiment = content.get("experiment") or path.stem
    for key, entry in runs.items():
        nerve = entry.get("nerve") if isinstance(entry, dict) else None
        if not isinstance(nerve, dict) or "per_site" not in nerve:
            raise InputError(f"run {key!r} of {str(path)!r} holds no NerVE series ('nerve' with 'per_site')")
        rows = []
        for i, step in enumerate(nerve["steps"]):
            for k, site in enumerate(nerve["sites"]):
                rows.append(
                    {
                        "step": int(step),
                        "split": "eval",
                        "site": site,
                        "layer": int(nerve["layers"][k]),
                        "dim": nerve["dims"][k],
                        "tokens": nerve["tokens"][i],
                        **{
                            name: math.nan if nerve["per_site"][name][i][k] is None else nerve["per_site"][name][i][k]
                            for name in METRIC_NAMES
                        },
                    }
                )
        frame = pd.DataFrame(rows)
        frame[list(METRIC_NAMES)] = frame[list(METRIC_NAMES)].astype(float)
        out[f"{experiment}/{key}"] = _with_mean(frame)
    return out


def _with_mean(metrics):
    """``metrics`` (per-site rows) with a ``site == "mean"`` row per (split, step), as :func:`load_run`."""
    import pandas as pd

    columns = ["step", "split", *ROW_KEYS]
    mean = (
        metrics.groupby(["split", "step"], sort=False)
        .agg({**{name: "mean" for name in METRIC_NAMES}, "tokens": "mean"})
        .reset_index()
        .assign(site="mean", layer=-1, dim=math.nan)
    )
    frame = pd.concat([metrics[columns], mean[columns]], ignore_index=True)
    return frame.sort_values(["split", "step", "layer", "site"], kind="stable").reset_index(drop=True)


def load_compare_inputs(paths) -> dict:
    """Run name -> metrics DataFrame (as :attr:`RunData.metrics`) for run directories and model-zoo
    result files (``*.json``, several runs each). A run directory is named by its folder (with its parent
    when two folders share a name)."""
    loaded: dict = {}
    for spec in paths:
        path = Path(spec)
        if path.is_file() and path.suffix == ".json":
            found = _zoo_runs(path)
        else:
            run = load_run(path)
            name = path.resolve().name
            if name in loaded:
                name = f"{path.resolve().parent.name}/{name}"
            found = {name: run.metrics}
        for name, frame in found.items():
            unique, n = name, 2
            while unique in loaded:
                unique, n = f"{name} ({n})", n + 1
            loaded[unique] = frame
    return loaded


def compare_table(runs: dict):
    """``compare.csv``: every run's per-site measurements, run, split, step, site, layer, tokens, metrics."""
    import pandas as pd

    parts = [frame[frame["site"] != "mean"].assign(run=name) for name, frame in runs.items()]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COMPARE_COLUMNS)
    return table[COMPARE_COLUMNS].reset_index(drop=True)


def write_compare(paths, out_dir=None) -> CompareResult:
    """Write ``compare.csv`` and one ``compare_<split>.png`` per split (layer-mean trajectories of every
    run overlaid, and their final per-layer profiles) into ``out_dir`` (default ``./nerve_compare``)."""
    from nerve_hf.sinks.files import check_writable_dir, write_csv, write_figure

    if len(paths) < 1:
        raise InputError("give at least one run directory or model-zoo result file")
    out_dir = check_writable_dir(out_dir if out_dir is not None else "nerve_compare")
    runs = load_compare_inputs(paths)
    table = compare_table(runs)
    files = [write_csv(out_dir / "compare.csv", table)]
    splits = _split_order(split for frame in runs.values() for split in frame["split"])
    for split in splits:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
        files.append(write_figure(out_dir / f"compare_{safe}.png", plots.plot_compare(runs, split)))
    return CompareResult(out_dir=out_dir, files=files, table=table, runs=runs)
