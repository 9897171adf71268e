"""Figures of NerVE metrics over training: per-layer trajectories, layer x step heatmaps, metrics against
the loss, the spectra's evolution, and several runs overlaid. Each takes the long DataFrames of
:mod:`nerve_hf.analysis.runs` (or of the spectra archive) and returns a ``matplotlib.figure.Figure`` built
without pyplot (no display backend, no global state): show it in a notebook, or save it with
:func:`nerve_hf.sinks.files.write_figure` (Agg).
"""

from __future__ import annotations

import math

from nerve_hf.analysis.plot_layout import METRIC_LABELS, even_ticks, grid, integer_axis, new_figure, panel_grid
from nerve_hf.errors import requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sites import family
from nerve_hf.tracking.measurements.flow import FLOW_STAGES

__all__ = [
    "plot_trajectories",
    "plot_heatmaps",
    "plot_metric_vs_loss",
    "plot_spectrum_evolution",
    "plot_compare",
    "SPECTRUM_FLOOR",
]

# Spectrum figures draw eigenvalues down to this fraction of the largest: the covariance is accumulated from
# float32 activations (round-off ~1e-7 of λ₁), so smaller ones are round-off, not spectrum.
SPECTRUM_FLOOR = 1e-7


def _site_order(frame) -> list[str]:
    """Per-layer sites in (family, layer) order; ``mean`` left out."""
    sites = frame[frame["site"] != "mean"][["site", "layer"]].drop_duplicates("site")
    pairs = list(zip(sites["site"], sites["layer"]))
    order = {name: i for i, name in enumerate(dict.fromkeys(family(site) for site, _ in pairs))}
    return [site for site, _ in sorted(pairs, key=lambda pair: (order[family(pair[0])], pair[1]))]


def plot_trajectories(metrics, split: str, losses=None, title: str | None = None):
    """Each metric over training steps, one line per layer (colour = depth) and the layer mean (black);
    with ``losses`` (step, split, loss) a panel shows the loss of the same split; a run measured with
    ``flow=True`` gains three flow panels: the layer-mean SE, PR and EEE at each stage of the FFN (input ->
    pre -> post -> output) over the steps, as the probe's ``flow.png`` shows them across layers."""
    with requires("analysis"):
        from matplotlib import colormaps

    frame = metrics[metrics["split"] == split]
    sites = _site_order(frame)
    loss = None if losses is None else losses[losses["split"] == split].sort_values("step")
    panels = list(METRIC_NAMES) + (["loss"] if loss is not None and len(loss) else [])
    flow = [key for key in ("se", "pr", "eee") if f"{key}_input" in frame and frame[f"{key}_input"].notna().any()]
    panels += [f"flow:{key}" for key in flow]
    figure, axes = panel_grid(len(panels))
    cmap = colormaps["viridis"]
    mean = frame[frame["site"] == "mean"].sort_values("step")
    for ax, name in zip(axes, panels):
        if name == "loss":
            ax.plot(loss["step"], loss["loss"], color="C3", marker=".")
            ax.set_title(f"{split} loss")
        elif name.startswith("flow:"):
            key = name.removeprefix("flow:")
            for stage, color in zip(FLOW_STAGES, ("C0", "C1", "C2", "C4")):
                ax.plot(mean["step"], mean[f"{key}_{stage}"], color=color, linewidth=1.5, label=stage)
            ax.set_title(f"{key.upper()} through the FFN (layer mean)")
            ax.legend(fontsize=6)
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
            if len(mean):  # none when the sites differ from step to step (layers_per_step)
                ax.plot(mean["step"], mean[name], color="black", linewidth=2, label="mean")
            ax.set_title(METRIC_LABELS[name])
        ax.set_xlabel("step")
        grid(ax)
    axes[0].legend(fontsize=6, ncol=2)
    figure.suptitle(title or f"NerVE metrics per layer over training ({split})")
    return figure


def plot_heatmaps(metrics, split: str):
    """Layer x step heatmap of each metric (rows: FFN sites in depth order; columns: measured steps)."""
    frame = metrics[(metrics["split"] == split) & (metrics["site"] != "mean")]
    sites = _site_order(frame)
    figure, axes = panel_grid(len(METRIC_NAMES))
    for ax, name in zip(axes, METRIC_NAMES):
        table = frame.pivot_table(index="site", columns="step", values=name, aggfunc="last", dropna=False)
        table = table.reindex(index=sites)
        steps = list(table.columns)
        image = ax.imshow(table.to_numpy(dtype=float), aspect="auto", interpolation="nearest", cmap="magma")
        figure.colorbar(image, ax=ax, shrink=0.8)
        ax.set_title(METRIC_LABELS[name])
        ax.set_xlabel("step")
        ticks = sorted(set(int(round(i)) for i in even_ticks(len(steps))))
        ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
        yticks = sorted(set(int(round(i)) for i in even_ticks(len(sites), 12)))
        ax.set_yticks(yticks, [sites[i] for i in yticks], fontsize=7)
    figure.suptitle(f"NerVE metrics, layer x step ({split})")
    return figure


def plot_metric_vs_loss(aligned, correlations, split: str, site: str = "mean"):
    """Each metric of ``site`` against the loss of the same step, with Pearson r in the title.

    ``aligned``: rows with step, split, site, the metrics and ``loss``; ``correlations``: the table of
    :func:`nerve_hf.analysis.correlations.correlations` (its r, p and n are shown, not recomputed).
    """
    frame = aligned[(aligned["split"] == split) & (aligned["site"] == site)]
    figure, axes = panel_grid(len(METRIC_NAMES))
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
        grid(ax)
    figure.colorbar(scatter, ax=list(axes[: len(METRIC_NAMES)]), shrink=0.6, label="step")
    figure.suptitle(f"{site} metrics vs {split} loss of the same step")
    return figure


def plot_spectrum_evolution(spectra, split: str, cumulative: bool = False):
    """How each FFN's spectrum changed over a run: one panel pair (pre, post) per FFN, one line per
    measurement coloured by step (viridis, colour bar), the rank on a log axis.

    ``cumulative=False``: normalised eigenvalues λᵢ/Σλ against rank i on log-log axes, cut at
    :data:`SPECTRUM_FLOOR` × λ₁: eigenvalues below it are round-off of the float32 activations, not data.
    Where the last measurement's spectrum ends before the width D (a pre-activation of a d-wide input has
    rank ≤ d < D), the ranks beyond it are shaded and labelled with that rank. ``True``: the cumulative
    share of variance against rank, the curve EEE integrates (its excess over the uniform spectrum's k/D,
    dashed).

    ``spectra``: :func:`nerve_hf.sinks.archive.load_spectra`'s DataFrame (split, step, site, pre, post).
    """
    import numpy as np

    with requires("analysis"):
        from matplotlib import cm, colors

    frame = spectra[spectra["split"] == split]
    sites = list(dict.fromkeys(frame["site"]))
    steps = sorted(frame["step"].unique())
    norm = colors.Normalize(vmin=min(steps), vmax=max(steps) if max(steps) > min(steps) else min(steps) + 1)
    figure, axes = panel_grid(2 * len(sites), columns=4, size=(3.4, 2.7))
    for index, site in enumerate(sites):
        for side, ax in zip(("pre", "post"), axes[2 * index : 2 * index + 2]):
            rank_bound, dim = None, 0
            for row in frame[frame["site"] == site].sort_values("step").itertuples():
                values = np.sort(np.clip(np.asarray(getattr(row, side), dtype=np.float64), 0, None))[::-1]
                if not np.isfinite(values).all() or values.sum() <= 0:
                    continue
                share, dim = values / values.sum(), len(values)
                rank = np.arange(1, dim + 1)
                color = cm.viridis(norm(row.step))
                if cumulative:
                    ax.plot(rank, np.cumsum(share), color=color, linewidth=1)
                else:
                    keep = share >= SPECTRUM_FLOOR * share[0]
                    ax.plot(rank[keep], share[keep], color=color, linewidth=1)
                    rank_bound = int(keep.sum())  # of the last measurement drawn
            ax.set_xscale("log")
            if cumulative:
                rank = np.arange(1, dim + 1)
                ax.plot(rank, rank / max(dim, 1), color="0.6", linestyle="--", linewidth=0.8, label="uniform")
                ax.set_ylim(0, 1.02)
                ax.set_ylabel("cumulative variance share")
            else:
                ax.set_yscale("log")
                ax.set_ylabel("λᵢ / Σλ")
                if rank_bound is not None and rank_bound < dim:
                    ax.axvspan(rank_bound, dim, color="0.9", linewidth=0, zorder=0)  # beyond the rank: round-off
                    ax.text(
                        rank_bound,
                        0.97,
                        f"rank {rank_bound} < D={dim} ",
                        transform=ax.get_xaxis_transform(),
                        fontsize=7,
                        ha="right",
                        va="top",
                        color="0.25",
                    )
            if dim:
                ax.set_xlim(1, dim)
            ax.set_title(f"{site} {side}", fontsize=9)
            ax.set_xlabel("rank i")
            grid(ax)
    mapper = cm.ScalarMappable(norm=norm, cmap="viridis")
    figure.colorbar(mapper, ax=list(axes[: 2 * len(sites)]), label="step", shrink=0.8)
    if cumulative:
        what = "cumulative variance share"
    else:
        what = f"normalised eigenvalue spectra (cut at {SPECTRUM_FLOOR:.0e} of λ₁)"
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
    figure = new_figure(3.6 * columns, 2.9 * 2 * rows)
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
        grid(ax)
    for metric, ax in zip(METRIC_NAMES, profile_axes):
        ax.set_title(f"{METRIC_LABELS[metric]}, last step, per layer")
        ax.set_xlabel("layer")
        integer_axis(ax)
        grid(ax)
    legend_ax.axis("off")
    handles, labels = trajectory_axes[0].get_legend_handles_labels()
    legend_ax.legend(handles, labels, loc="center", fontsize=8, title="run")
    all_families = list(dict.fromkeys(family(site) for name in names for site in runs[name]["site"] if site != "mean"))
    if len(all_families) > 1 and rows * columns + n < len(axes):  # which line style is which FFN family
        with requires("analysis"):
            from matplotlib.lines import Line2D

        style_ax = axes[rows * columns + n]
        style_ax.set_visible(True)
        style_ax.axis("off")
        lines = [Line2D([], [], color="0.3", linestyle=styles[i % len(styles)]) for i in range(len(all_families))]
        style_ax.legend(lines, all_families, loc="center", fontsize=8, title="FFN family")
    figure.suptitle(f"NerVE metrics of {len(names)} runs ({split})")
    return figure
