"""The files of ``nerve report RUN_DIR``: ``correlations.csv``, ``summary.md`` and the run's figures."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from nerve_hf.analysis import expert_plots, run_plots
from nerve_hf.analysis.correlations import MIN_POINTS, correlations
from nerve_hf.analysis.runs import RunData, aligned, load_run, split_order, splits_without_mean
from nerve_hf.analysis.trend import FEW_POINTS, trend_free_correlations
from nerve_hf.errors import InputError
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sinks.archive import load_spectra
from nerve_hf.sites import is_mean

__all__ = ["summary_markdown", "ReportResult", "write_report"]


def _few_points_message(run: RunData, corr, min_points: int) -> str:
    counts = corr.groupby("split")["n"].max() if len(corr) else None
    measured = run.metrics.groupby("split")["step"].nunique()
    parts = []
    for split in split_order(measured.index):
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
    sites = run.metrics[~run.metrics["site"].map(is_mean)]["site"].nunique()
    for split in split_order(run.metrics["split"]):
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
        f"{MIN_POINTS} pairs or a constant series. A metric and a loss that both drift with the step correlate "
        "strongly whatever links them: r(Δ) is Pearson r of their step-to-step changes (first differences), "
        "which the shared trend does not inflate, over n(Δ) = n − 1 changes. r from fewer than "
        f"{FEW_POINTS} points is flagged (few).",
        "",
    ]

    rotating = splits_without_mean(run.metrics)
    has_trend = "r_diff" in corr
    for split in split_order(corr["split"]):
        part = corr[(corr["split"] == split) & corr["site"].map(is_mean)]  # mean, or mean/<family> each
        if split in rotating:
            lines += [
                f"## `{split}`: no layer mean",
                "",
                "Its measurements do not all cover the same FFN sites (a `layers_per_step` run measures another "
                "group of layers at each step), so no layer mean is built; each site's own series is below.",
            ]
            continue
        head, rule = "| metric | r | p | n |", "|---|---:|---:|---:|"
        if has_trend:
            head, rule = head + " r(Δ) | p(Δ) | n(Δ) | |", rule + "---:|---:|---:|---|"
        lines += [f"## `{split}`: layer-mean metric vs loss", "", head, rule]
        for row in part.itertuples():
            metric = row.metric if row.site == "mean" else f"{row.metric} ({row.site})"
            line = f"| {metric} | {_num(row.r, '+.4f')} | {_num(row.p, '.2e')} | {row.n} |"
            if has_trend:
                flag = f"few (< {FEW_POINTS})" if row.few_points else ""
                line += f" {_num(row.r_diff, '+.4f')} | {_num(row.p_diff, '.2e')} | {row.n_diff} | {flag} |"
            lines.append(line)
        layers = corr[(corr["split"] == split) & ~corr["site"].map(is_mean)].dropna(subset=["r"])
        if len(layers):
            top = layers.reindex(layers["r"].abs().sort_values(ascending=False).index).head(5)
            lines += ["", "Strongest per-layer correlations:", "", "| site | metric | r | n |", "|---|---|---:|---:|"]
            lines += [f"| {row.site} | {row.metric} | {row.r:+.4f} | {row.n} |" for row in top.itertuples()]
        lines.append("")

    for split in split_order(run.metrics["split"]):
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
    trend = trend_free_correlations(table, min_points)
    corr = corr.merge(trend, on=["split", "site", "metric"], how="left", sort=False)
    files = [write_csv(out_dir / "correlations.csv", corr)]
    spectra = load_spectra(run.run_dir)  # the run's spectra archive (empty without one)
    figures: dict[str, list[str]] = {}
    for split in split_order(run.metrics["split"]):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
        lines = expert_plots.collapse_experts(run.metrics)  # MoE: a line per layer (its experts' mean)
        made = {
            f"trajectories_{safe}.png": run_plots.plot_trajectories(lines, split, run.losses),
            f"heatmaps_{safe}.png": run_plots.plot_heatmaps(lines, split),
        }
        if ((table["split"] == split) & (table["site"] == "mean")).any():
            made[f"scatter_{safe}.png"] = run_plots.plot_metric_vs_loss(table, corr, split)
        if split in set(spectra["split"]):
            made[f"spectra_{safe}.png"] = run_plots.plot_spectrum_evolution(spectra, split)
            made[f"cumulative_{safe}.png"] = run_plots.plot_spectrum_evolution(spectra, split, cumulative=True)
        made.update(expert_plots.run_expert_figures(run, split, safe))  # MoE runs: expert x layer, summaries
        for name, figure in made.items():
            files.append(write_figure(out_dir / name, figure))
        figures[split] = list(made)
    files.append(write_text(out_dir / "summary.md", summary_markdown(run, corr, figures)))
    return ReportResult(out_dir=out_dir, files=files, correlations=corr, run=run)
