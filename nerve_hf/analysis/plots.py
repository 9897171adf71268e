"""Figures of NerVE metrics. Every function returns a ``matplotlib.figure.Figure`` built without pyplot
(no display backend, no global state): show it in a notebook, or save it with
:func:`nerve_hf.sinks.files.write_figure` (Agg).

Probe figures take the rows of one measurement (``SpectralReport.rows`` or its DataFrame); run figures
take the long DataFrames of :mod:`nerve_hf.analysis.runs`.
"""

from __future__ import annotations

import math

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sites import family

__all__ = [
    "METRIC_LABELS",
    "plot_layer_metrics",
    "plot_js",
    "plot_spectra",
    "plot_flow",
    "plot_position_buckets",
    "plot_cross_layer",
    "plot_trajectories",
    "plot_heatmaps",
    "plot_metric_vs_loss",
    "plot_spectrum_evolution",
    "plot_compare",
]


def _label(name: str) -> str:
    """``se_pre`` -> ``SE pre``; ``js`` (no side: it compares the two) -> ``JS(pre, post)``."""
    metric, _, side = name.partition("_")
    return f"{metric.upper()} {side}" if side else f"{metric.upper()}(pre, post)"


METRIC_LABELS = {name: _label(name) for name in METRIC_NAMES}  # metric column -> axis label
_PAIRS = (("se", "spectral entropy (SE)"), ("pr", "participation ratio (PR)"), ("eee", "early enrichment (EEE)"))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _integer_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _frame(rows):
    import pandas as pd

    return rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))


def _families(frame) -> list[tuple[str, object]]:
    """(family, rows sorted by layer) in order of first appearance."""
    frame = frame.assign(_family=frame["site"].map(family))
    return [(name, frame[frame["_family"] == name].sort_values("layer")) for name in dict.fromkeys(frame["_family"])]


# ------------------------------------------------------------------------------------ probe figures
def plot_layer_metrics(rows, title: str | None = None):
    """Pre vs post SE, PR and EEE per layer (one panel each; one line pair per FFN family)."""
    frame = _frame(rows)
    figure = _figure(13, 3.8)
    axes = figure.subplots(1, 3)
    groups = _families(frame)
    for ax, (key, label) in zip(axes, _PAIRS):
        for name, group in groups:
            suffix = f" ({name})" if len(groups) > 1 else ""
            ax.plot(group["layer"], group[f"{key}_pre"], marker="o", label=f"pre{suffix}")
            ax.plot(group["layer"], group[f"{key}_post"], marker="s", linestyle="--", label=f"post{suffix}")
        ax.set_title(label)
        _integer_axis(ax)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def plot_js(rows, title: str | None = None):
    """Jensen-Shannon divergence between the pre and post spectra, per layer."""
    frame = _frame(rows)
    figure = _figure(6, 3.8)
    ax = figure.subplots()
    groups = _families(frame)
    for name, group in groups:
        ax.plot(group["layer"], group["js"], marker="o", label=name)
    ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1, label="ln 2 (maximum)")
    _integer_axis(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("JS divergence")
    ax.set_title(title or "JS(pre, post) per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def plot_spectra(eigenvalues: dict, sites: list[str], title: str | None = None):
    """Log-log eigenvalue spectra (rank vs eigenvalue) of ``sites``: pre and post panels.

    ``eigenvalues``: site -> (pre, post), descending. Zero eigenvalues have no logarithm and are left out.
    """
    import numpy as np

    figure = _figure(11, 4)
    axes = figure.subplots(1, 2, sharey=True)
    colors = [f"C{i % 10}" for i in range(len(sites))]
    for side, ax in zip((0, 1), axes):
        for site, color in zip(sites, colors):
            values = np.asarray(eigenvalues[site][side], dtype=np.float64)
            keep = values > 0
            ax.loglog(np.arange(1, len(values) + 1)[keep], values[keep], color=color, label=site)
        ax.set_title(("pre" if side == 0 else "post") + "-activation spectrum")
        ax.set_xlabel("rank")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("eigenvalue")
    if title:
        figure.suptitle(title)
    return figure


def plot_flow(rows, title: str | None = None):
    """Variance flow through each FFN (``flow=True`` rows): SE, PR and EEE at input -> pre -> post -> output,
    one line per layer (colour = depth), and JS between consecutive stages per layer."""
    from matplotlib import colormaps

    frame = _frame(rows)
    stages = ("input", "pre", "post", "output")
    figure = _figure(16, 3.8)
    axes = figure.subplots(1, 4)
    cmap = colormaps["viridis"]
    groups = _families(frame)
    for ax, (key, label) in zip(axes, _PAIRS):
        for name, group in groups:
            for k, (_, row) in enumerate(group.iterrows()):
                suffix = f" ({name})" if len(groups) > 1 else ""
                ax.plot(
                    range(4),
                    [row[f"{key}_{stage}"] for stage in stages],
                    marker="o",
                    color=cmap(k / max(len(group) - 1, 1)),
                    label=f"layer {row['layer']}{suffix}" if len(group) <= 12 else None,
                )
        ax.set_xticks(range(4), stages)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    ax = axes[3]
    for name, group in groups:
        suffix = f" ({name})" if len(groups) > 1 else ""
        for column, label in (
            ("js_input_pre", "input -> pre"),
            ("js", "pre -> post"),
            ("js_post_output", "post -> output"),
        ):
            ax.plot(group["layer"], group[column], marker="o", label=label + suffix)
    _integer_axis(ax)
    ax.set_xlabel("layer")
    ax.set_title("JS between consecutive stages")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.suptitle(title or "variance flow through the FFN: input -> pre -> post -> output")
    return figure


def plot_position_buckets(positions, title: str | None = None):
    """Each metric against the position bucket, one line per layer (``SpectralReport.positions``)."""
    from matplotlib import colormaps

    frame = _frame(positions)
    buckets = list(dict.fromkeys(frame["bucket"]))
    sites = list(dict.fromkeys(frame["site"]))
    figure, axes = _grid(len(METRIC_NAMES))
    cmap = colormaps["viridis"]
    for ax, name in zip(axes, METRIC_NAMES):
        for k, site in enumerate(sites):
            series = frame[frame["site"] == site].set_index("bucket").reindex(buckets)
            ax.plot(
                range(len(buckets)),
                series[name],
                marker="o",
                color=cmap(k / max(len(sites) - 1, 1)),
                label=site if len(sites) <= 12 else None,
            )
        ax.set_xticks(range(len(buckets)), buckets, fontsize=7, rotation=30)
        ax.set_xlabel("token positions")
        ax.set_title(METRIC_LABELS[name])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    figure.suptitle(title or "NerVE metrics per position bucket")
    return figure


def plot_cross_layer(rows, cross_rows, title: str | None = None):
    """Depth x depth heatmaps of linear CKA between FFN inputs and of JS between the pre and the post
    spectra of two layers (``SpectralReport.cross_layer``), one row of panels per site family."""
    import numpy as np

    from nerve_hf.analysis.layers import layer_matrix

    families = list(dict.fromkeys(family(row["site"]) for row in rows))
    figure = _figure(14, 4.4 * len(families))
    grid = figure.subplots(len(families), 3, squeeze=False)
    panels = (
        ("cka", "linear CKA of FFN inputs", "viridis"),
        ("js_pre", "JS(pre_a, pre_b)", "magma"),
        ("js_post", "JS(post_a, post_b)", "magma"),
    )
    for axes, name in zip(grid, families):
        for ax, (key, label, cmap) in zip(axes, panels):
            matrix = layer_matrix(rows, cross_rows, key, family=name)
            values = matrix.to_numpy(dtype=float)
            layers = list(matrix.index)
            image = ax.imshow(values, interpolation="nearest", cmap=cmap, vmin=0.0, vmax=1.0 if key == "cka" else None)
            figure.colorbar(image, ax=ax, shrink=0.8)
            if len(layers) <= 8:  # few layers: the values themselves
                for i, j in np.ndindex(values.shape):
                    if math.isfinite(values[i, j]) and i != j:
                        text = f"{values[i, j]:.3f}" if key == "cka" else f"{values[i, j]:.1e}"
                        color = "black" if image.norm(values[i, j]) > 0.5 else "white"  # light colours are high
                        ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
            ticks = sorted(set(int(round(i)) for i in _even_ticks(len(layers), 12)))
            ax.set_xticks(ticks, [str(layers[i]) for i in ticks], fontsize=7)
            ax.set_yticks(ticks, [str(layers[i]) for i in ticks], fontsize=7)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            ax.set_title(label + (f" ({name})" if len(families) > 1 else ""))
    figure.suptitle(title or "cross-layer coherence")
    return figure


# -------------------------------------------------------------------------------------- run figures
def _grid(n: int, columns: int = 4, size: tuple[float, float] = (3.6, 2.9)):
    rows = math.ceil(n / columns)
    figure = _figure(size[0] * columns, size[1] * rows)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return figure, axes


def _site_order(frame) -> list[str]:
    """Per-layer sites in (family, layer) order; ``mean`` left out."""
    sites = frame[frame["site"] != "mean"][["site", "layer"]].drop_duplicates("site")
    pairs = list(zip(sites["site"], sites["layer"]))
    order = {name: i for i, name in enumerate(dict.fromkeys(family(site) for site, _ in pairs))}
    return [site for site, _ in sorted(pairs, key=lambda pair: (order[family(pair[0])], pair[1]))]


def plot_trajectories(metrics, split: str, losses=None, title: str | None = None):
    """Each metric over training steps, one line per layer (colour = depth) and the layer mean (black);
    with ``losses`` (step, split, loss) a last panel shows the loss of the same split."""
    from matplotlib import colormaps

    frame = metrics[metrics["split"] == split]
    sites = _site_order(frame)
    loss = None if losses is None else losses[losses["split"] == split].sort_values("step")
    panels = list(METRIC_NAMES) + (["loss"] if loss is not None and len(loss) else [])
    figure, axes = _grid(len(panels))
    cmap = colormaps["viridis"]
    for ax, name in zip(axes, panels):
        if name == "loss":
            ax.plot(loss["step"], loss["loss"], color="C3", marker=".")
            ax.set_title(f"{split} loss")
        else:
            for i, site in enumerate(sites):
                series = frame[frame["site"] == site].sort_values("step")
                ax.plot(
                    series["step"],
                    series[name],
                    color=cmap(i / max(len(sites) - 1, 1)),
                    linewidth=1,
                    label=site if len(sites) <= 12 else None,
                )
            mean = frame[frame["site"] == "mean"].sort_values("step")
            ax.plot(mean["step"], mean[name], color="black", linewidth=2, label="mean")
            ax.set_title(METRIC_LABELS[name])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    figure.suptitle(title or f"NerVE metrics per layer over training ({split})")
    return figure


def plot_heatmaps(metrics, split: str):
    """Layer x step heatmap of each metric (rows: FFN sites in depth order; columns: measured steps)."""
    frame = metrics[(metrics["split"] == split) & (metrics["site"] != "mean")]
    sites = _site_order(frame)
    figure, axes = _grid(len(METRIC_NAMES))
    for ax, name in zip(axes, METRIC_NAMES):
        table = frame.pivot_table(index="site", columns="step", values=name, aggfunc="last", dropna=False)
        table = table.reindex(index=sites)
        steps = list(table.columns)
        image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", interpolation="nearest", cmap="magma")
        figure.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(METRIC_LABELS[name])
        ax.set_xlabel("step")
        ticks = sorted(set(int(round(i)) for i in _even_ticks(len(steps))))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
        yticks = sorted(set(int(round(i)) for i in _even_ticks(len(sites), 12)))
        ax.set_yticks(yticks, [sites[i] for i in yticks], fontsize=7)
    figure.suptitle(f"NerVE metrics, layer x step ({split})")
    return figure


def _even_ticks(n: int, most: int = 6) -> list[float]:
    if n <= most:
        return list(range(n))
    return [i * (n - 1) / (most - 1) for i in range(most)]


def plot_metric_vs_loss(aligned, correlations, split: str, site: str = "mean"):
    """Each metric of ``site`` against the loss of the same step, with Pearson r in the title.

    ``aligned``: rows with step, split, site, the metrics and ``loss``; ``correlations``: the table of
    :func:`nerve_hf.analysis.runs.correlations` (its r, p and n are shown, not recomputed).
    """
    frame = aligned[(aligned["split"] == split) & (aligned["site"] == site)]
    figure, axes = _grid(len(METRIC_NAMES))
    for ax, name in zip(axes, METRIC_NAMES):
        points = frame[["step", name, "loss"]].dropna()
        scatter = ax.scatter(points[name], points["loss"], c=points["step"], cmap="viridis", s=18)
        match = correlations[
            (correlations["split"] == split) & (correlations["site"] == site) & (correlations["metric"] == name)
        ]
        r = float(match["r"].iloc[0]) if len(match) else float("nan")
        n = int(match["n"].iloc[0]) if len(match) else len(points)
        ax.set_title(
            f"{METRIC_LABELS[name]}: r = {r:+.3f} (n = {n})"
            if math.isfinite(r)
            else f"{METRIC_LABELS[name]}: r undefined (n = {n})",
            fontsize=9,
        )
        ax.set_xlabel(METRIC_LABELS[name])
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    figure.colorbar(scatter, ax=list(axes[: len(METRIC_NAMES)]), shrink=0.6, label="step")
    figure.suptitle(f"{site} metrics vs {split} loss of the same step")
    return figure


def plot_spectrum_evolution(spectra, split: str, cumulative: bool = False):
    """How each FFN's spectrum changed over a run: one panel pair (pre, post) per FFN, one line per
    measurement coloured by step (viridis, colour bar). ``cumulative=False``: normalised eigenvalues
    λᵢ/Σλ against rank i on log-log axes; ``True``: the cumulative share of variance against rank,
    the curve EEE integrates (its excess over the diagonal).

    ``spectra``: :func:`nerve_hf.sinks.archive.load_spectra`'s DataFrame (split, step, site, pre, post).
    """
    import numpy as np
    from matplotlib import cm, colors

    frame = spectra[spectra["split"] == split]
    sites = list(dict.fromkeys(frame["site"]))
    steps = sorted(frame["step"].unique())
    norm = colors.Normalize(vmin=min(steps), vmax=max(steps) if max(steps) > min(steps) else min(steps) + 1)
    figure, axes = _grid(2 * len(sites), columns=4, size=(3.4, 2.7))
    for index, site in enumerate(sites):
        for side, ax in zip(("pre", "post"), axes[2 * index : 2 * index + 2]):
            for row in frame[frame["site"] == site].sort_values("step").itertuples():
                values = np.clip(np.asarray(getattr(row, side), dtype=np.float64), 0, None)
                if not np.isfinite(values).all() or values.sum() <= 0:
                    continue
                share = values / values.sum()
                rank = np.arange(1, len(share) + 1)
                color = cm.viridis(norm(row.step))
                if cumulative:
                    ax.plot(rank, np.cumsum(share), color=color, linewidth=1)
                else:
                    keep = share > 0
                    ax.loglog(rank[keep], share[keep], color=color, linewidth=1)
            if cumulative:
                dim = len(frame[frame["site"] == site].iloc[0][side])
                ax.plot([0, dim], [0, 1], color="0.6", linestyle="--", linewidth=0.8, label="uniform")
                ax.set_ylim(0, 1.02)
                ax.set_ylabel("cumulative variance share")
            else:
                ax.set_ylabel("λᵢ / Σλ")
            ax.set_title(f"{site} {side}", fontsize=9)
            ax.set_xlabel("rank i")
            ax.grid(alpha=0.3, which="both")
    mapper = cm.ScalarMappable(norm=norm, cmap="viridis")
    figure.colorbar(mapper, ax=list(axes[: 2 * len(sites)]), label="step", shrink=0.8)
    what = "cumulative variance" if cumulative else "normalised eigenvalue spectra"
    figure.suptitle(f"{split}: {what} over the run ({len(steps)} measurements)")
    return figure


def plot_compare(runs: dict, split: str):
    """Several runs overlaid: the layer-mean trajectory of each metric over steps (top block, one colour
    per run, one legend with the run names) and each metric per layer at the run's last measured step
    (bottom block; one line per run and FFN family, families told apart by line style).

    ``runs``: run name -> metrics DataFrame as :attr:`nerve_hf.analysis.runs.RunData.metrics` (with ``mean`` rows).
    Runs without measurements of ``split`` are left out.
    """
    names = [name for name, frame in runs.items() if (frame["split"] == split).any()]
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    n = len(METRIC_NAMES)
    columns = 4
    rows = math.ceil((n + 1) / columns)  # the trajectories and the legend, then the profiles
    figure = _figure(3.6 * columns, 2.9 * 2 * rows)
    axes = figure.subplots(2 * rows, columns, squeeze=False).ravel()
    trajectory_axes, legend_ax = axes[:n], axes[n]
    profile_axes = axes[rows * columns : rows * columns + n]
    for ax in list(axes[n + 1 : rows * columns]) + list(axes[rows * columns + n :]):
        ax.set_visible(False)
    styles = ("-", "--", ":", "-.")
    for name in names:
        frame = runs[name][runs[name]["split"] == split]
        mean = frame[frame["site"] == "mean"].sort_values("step")
        last = frame[(frame["site"] != "mean") & (frame["step"] == frame["step"].max())]
        families = list(dict.fromkeys(last["site"].map(family)))
        for metric, ax in zip(METRIC_NAMES, trajectory_axes):
            ax.plot(mean["step"], mean[metric], color=colours[name], marker=".", linewidth=1.5, label=name)
        for metric, ax in zip(METRIC_NAMES, profile_axes):
            for i, fam in enumerate(families):
                part = last[last["site"].map(family) == fam].sort_values("layer")
                ax.plot(
                    part["layer"],
                    part[metric],
                    color=colours[name],
                    linestyle=styles[i % len(styles)],
                    marker="o",
                    markersize=3,
                    label=f"{name} ({fam})" if len(families) > 1 else name,
                )
    for metric, ax in zip(METRIC_NAMES, trajectory_axes):
        ax.set_title(f"{METRIC_LABELS[metric]}, layer mean")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for metric, ax in zip(METRIC_NAMES, profile_axes):
        ax.set_title(f"{METRIC_LABELS[metric]}, last step, per layer")
        ax.set_xlabel("layer")
        _integer_axis(ax)
        ax.grid(alpha=0.3)
    legend_ax.axis("off")
    handles, labels = trajectory_axes[0].get_legend_handles_labels()
    legend_ax.legend(handles, labels, loc="center", fontsize=8, title="run")
    all_families = list(dict.fromkeys(family(site) for name in names for site in runs[name]["site"] if site != "mean"))
    if len(all_families) > 1 and rows * columns + n < len(axes):  # which line style is which FFN family
        from matplotlib.lines import Line2D

        style_ax = axes[rows * columns + n]
        style_ax.set_visible(True)
        style_ax.axis("off")
        lines = [Line2D([], [], color="0.3", linestyle=styles[i % len(styles)]) for i in range(len(all_families))]
        style_ax.legend(lines, all_families, loc="center", fontsize=8, title="FFN family")
    figure.suptitle(f"NerVE metrics of {len(names)} runs ({split})")
    return figure
