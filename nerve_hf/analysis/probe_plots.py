"""Figures of one NerVE measurement: metrics per layer, JS, eigenvalue spectra, the variance flow, position
buckets and cross-layer coherence. Each takes the rows of one measurement (``SpectralReport.rows`` or its
DataFrame, or the report's other tables) and returns a ``matplotlib.figure.Figure`` built without pyplot
(no display backend, no global state): show it in a notebook, or save it with
:func:`nerve_hf.sinks.files.write_figure` (Agg).
"""

from __future__ import annotations

import math

from nerve_hf.analysis.plot_layout import METRIC_LABELS, even_ticks, grid, integer_axis, new_figure, panel_grid
from nerve_hf.errors import requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sites import family

__all__ = [
    "plot_layer_metrics",
    "plot_js",
    "plot_spectra",
    "plot_flow",
    "plot_position_buckets",
    "plot_cross_layer",
]

_PAIRS = (("se", "spectral entropy (SE)"), ("pr", "participation ratio (PR)"), ("eee", "early enrichment (EEE)"))


def _frame(rows):
    with requires("analysis"):
        import pandas as pd

    return rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))


def _families(frame) -> list[tuple[str, object]]:
    """(family, rows sorted by layer) in order of first appearance."""
    frame = frame.assign(_family=frame["site"].map(family))
    return [(name, frame[frame["_family"] == name].sort_values("layer")) for name in dict.fromkeys(frame["_family"])]


def plot_layer_metrics(rows, title: str | None = None):
    """Pre vs post SE, PR and EEE per layer (one panel each; one line pair per FFN family)."""
    frame = _frame(rows)
    figure = new_figure(13, 3.8)
    axes = figure.subplots(1, 3)
    groups = _families(frame)
    for ax, (key, label) in zip(axes, _PAIRS):
        for name, group in groups:
            suffix = f" ({name})" if len(groups) > 1 else ""
            ax.plot(group["layer"], group[f"{key}_pre"], marker="o", label=f"pre{suffix}")
            ax.plot(group["layer"], group[f"{key}_post"], marker="s", linestyle="--", label=f"post{suffix}")
        ax.set_title(label)
        integer_axis(ax)
        ax.set_xlabel("layer")
        grid(ax)
        ax.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return figure


def plot_js(rows, title: str | None = None):
    """Jensen-Shannon divergence between the pre and post spectra, per layer."""
    frame = _frame(rows)
    figure = new_figure(6, 3.8)
    ax = figure.subplots()
    groups = _families(frame)
    for name, group in groups:
        ax.plot(group["layer"], group["js"], marker="o", label=name)
    ax.axhline(math.log(2), color="grey", linestyle=":", linewidth=1, label="ln 2 (maximum)")
    integer_axis(ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("JS divergence")
    ax.set_title(title or "JS(pre, post) per layer")
    grid(ax)
    ax.legend(fontsize=8)
    return figure


def plot_spectra(eigenvalues: dict, sites: list[str], title: str | None = None):
    """Log-log eigenvalue spectra (rank vs eigenvalue) of ``sites``: pre and post panels.

    ``eigenvalues``: site -> (pre, post), descending. Eigenvalues below
    :data:`~nerve_hf.analysis.run_plots.SPECTRUM_FLOOR` × λ₁ (round-off of the float32 activations, zeros
    included) are left out, as in the run report's spectrum figure.
    """
    import numpy as np

    from nerve_hf.analysis.run_plots import SPECTRUM_FLOOR

    figure = new_figure(11, 4)
    axes = figure.subplots(1, 2, sharey=True)
    colors = [f"C{i % 10}" for i in range(len(sites))]
    for side, ax in zip((0, 1), axes):
        for site, color in zip(sites, colors):
            values = np.asarray(eigenvalues[site][side], dtype=np.float64)
            keep = (values > 0) & (values >= SPECTRUM_FLOOR * values.max(initial=0))
            ax.loglog(np.arange(1, len(values) + 1)[keep], values[keep], color=color, label=site)
        ax.set_title(("pre" if side == 0 else "post") + "-activation spectrum")
        ax.set_xlabel("rank")
        grid(ax)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("eigenvalue")
    if title:
        figure.suptitle(title)
    return figure


def plot_flow(rows, title: str | None = None):
    """Variance flow through each FFN (``flow=True`` rows): SE, PR and EEE at input -> pre -> post -> output,
    one line per layer (colour = depth), and JS between consecutive stages per layer."""
    with requires("analysis"):
        from matplotlib import colormaps

    frame = _frame(rows)
    stages = ("input", "pre", "post", "output")
    figure = new_figure(16, 3.8)
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
        grid(ax)
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
    integer_axis(ax)
    ax.set_xlabel("layer")
    ax.set_title("JS between consecutive stages")
    grid(ax)
    ax.legend(fontsize=7)
    figure.suptitle(title or "variance flow through the FFN: input -> pre -> post -> output")
    return figure


def plot_position_buckets(positions, title: str | None = None):
    """Each metric against the position bucket, one line per layer (``SpectralReport.positions``)."""
    with requires("analysis"):
        from matplotlib import colormaps

    frame = _frame(positions)
    buckets = list(dict.fromkeys(frame["bucket"]))
    sites = list(dict.fromkeys(frame["site"]))
    figure, axes = panel_grid(len(METRIC_NAMES))
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
        grid(ax)
    axes[0].legend(fontsize=6, ncol=2)
    figure.suptitle(title or "NerVE metrics per position bucket")
    return figure


def plot_cross_layer(rows, cross_rows, title: str | None = None):
    """Depth x depth heatmaps of linear CKA between FFN inputs and of JS between the pre and the post
    spectra of two layers (``SpectralReport.cross_layer``), one row of panels per site family."""
    import numpy as np

    from nerve_hf.analysis.layers import layer_matrix

    families = list(dict.fromkeys(family(row["site"]) for row in rows))
    figure = new_figure(14, 4.4 * len(families))
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
            ticks = sorted(set(int(round(i)) for i in even_ticks(len(layers), 12)))
            ax.set_xticks(ticks, [str(layers[i]) for i in ticks], fontsize=7)
            ax.set_yticks(ticks, [str(layers[i]) for i in ticks], fontsize=7)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
            ax.set_title(label + (f" ({name})" if len(families) > 1 else ""))
    figure.suptitle(title or "cross-layer coherence")
    return figure
