"""Figures of routed experts (MoE models): one measurement as expert x layer heatmaps, and a run's per-layer
summaries over experts through training.

Both read expert rows as the tracker reports them and ``nerve_metrics.jsonl`` records them (``kind ==
"expert"``, with ``layer``, ``expert``, ``tokens`` and the metrics). The PR gain is ``pr_post / pr_pre``; the
per-layer summaries are :func:`~nerve_hf.tracking.measurements.experts.expert_summaries`, the same
token-weighted mean, min and max over a layer's measured experts that the Trainer's logs carry. Each function
returns a ``matplotlib.figure.Figure`` built without pyplot; save it with
:func:`nerve_hf.sinks.files.write_figure`.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

from nerve_hf.analysis.plot_layout import even_ticks, integer_axis, new_figure
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.tracking.measurements.experts import expert_summaries

__all__ = [
    "collapse_experts",
    "expert_rows",
    "expert_matrix",
    "layer_summaries",
    "plot_expert_heatmaps",
    "plot_expert_summaries",
    "routing_from_logs",
    "run_expert_figures",
    "summary_rows",
]

# (value, title, colour map) of the heatmap panels
HEATMAPS = (
    ("pr_post", "PR post", "magma"),
    ("pr_gain", "PR gain (PR post / PR pre)", "coolwarm"),
    ("tokens", "tokens per expert", "viridis"),
)


def expert_rows(rows: Iterable[dict]) -> list[dict]:
    """The rows of routed experts among ``rows`` (``kind == "expert"``)."""
    return [row for row in rows if row.get("kind") == "expert"]


def _value(row: dict, name: str) -> float:
    def number(key: str) -> float:
        value = row.get(key)
        return float("nan") if value is None else float(value)

    if name == "pr_gain":
        pre = number("pr_pre")
        return number("pr_post") / pre if pre else float("nan")
    return number(name)


def expert_matrix(rows: Iterable[dict], name: str):
    """``(layers, experts, matrix [len(experts), len(layers)])`` of ``name`` (a metric, ``"pr_gain"`` or
    ``"tokens"``) over the expert rows; NaN where an expert of a layer was not measured."""
    import numpy as np

    rows = expert_rows(rows)
    layers = sorted({int(row["layer"]) for row in rows})
    experts = sorted({int(row["expert"]) for row in rows})
    matrix = np.full((len(experts), len(layers)), np.nan)  # [E, L]
    for row in rows:
        matrix[experts.index(int(row["expert"])), layers.index(int(row["layer"]))] = _value(row, name)
    return layers, experts, matrix


def plot_expert_heatmaps(rows: Iterable[dict], title: str = ""):
    """Expert x layer heatmaps of PR post, the PR gain (diverging colours centred at 1: post wider than pre
    is red) and the tokens routed to each expert (grey: an expert not measured, or with fewer than two tokens
    for a metric)."""
    rows = expert_rows(rows)
    figure = new_figure(4.2 * len(HEATMAPS), 3.6)
    axes = figure.subplots(1, len(HEATMAPS), squeeze=False).ravel()
    for ax, (name, label, cmap) in zip(axes, HEATMAPS):
        layers, experts, matrix = expert_matrix(rows, name)
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=_cmap(cmap), norm=_norm(name, matrix))
        figure.colorbar(image, ax=ax, shrink=0.85)
        ax.set_title(label)
        ax.set_xlabel("layer")
        ax.set_ylabel("expert")
        xticks = sorted(set(int(round(i)) for i in even_ticks(len(layers), 12)))
        ax.set_xticks(xticks, [str(layers[i]) for i in xticks], fontsize=7)
        yticks = sorted(set(int(round(i)) for i in even_ticks(len(experts), 16)))
        ax.set_yticks(yticks, [str(experts[i]) for i in yticks], fontsize=7)
    figure.suptitle(title or "routed experts: expert x layer")
    return figure


def _cmap(name: str):
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="lightgrey")


def _norm(name: str, matrix):
    """The PR gain's colours centred at 1 (no change) when its values lie on both sides; else linear."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    finite = matrix[np.isfinite(matrix)]
    if name == "pr_gain" and finite.size and finite.min() < 1 < finite.max():
        return TwoSlopeNorm(vcenter=1.0, vmin=float(finite.min()), vmax=float(finite.max()))
    return None


def summary_rows(rows: Iterable[dict]) -> list[dict]:
    """One row per MoE layer (``site`` ``"<family>.<layer>"``, ``kind`` ``"expert"``, ``tokens``, and each metric
    as the token-weighted mean over the layer's experts): the expert rows of a measurement as per-layer lines."""
    rows = expert_rows(rows)
    out = []
    for (family, layer), values in expert_summaries(rows).items():
        tokens = sum(int(r["tokens"]) for r in rows if r["layer"] == layer and r["site"].startswith(family + "["))
        metrics = {key[: -len("_mean")]: value for key, value in values.items() if key.endswith("_mean")}
        out.append({"site": f"{family}.{layer}", "layer": layer, "tokens": tokens, "kind": "expert", **metrics})
    return out


def layer_summaries(records: Iterable[dict], split: str):
    """The per-layer summaries over experts of every measurement of ``split`` in ``records`` (the run's JSONL
    records) as a ``pandas.DataFrame``: step, family, layer, ``<metric>_mean|_min|_max`` and ``pr_gain_*``."""
    import pandas as pd

    by_step: dict[int, list[dict]] = {}
    for record in expert_rows(records):
        if record.get("split", split) == split:
            clean = {k: (float("nan") if v is None else v) for k, v in record.items()}
            by_step.setdefault(int(record["step"]), []).append(clean)
    out = []
    for step in sorted(by_step):
        for (family, layer), values in expert_summaries(by_step[step]).items():
            out.append({"step": step, "family": family, "layer": layer, **values})
    return pd.DataFrame(out)


def plot_expert_summaries(summaries, split: str, routing=None):
    """Per MoE layer over training: the token-weighted mean of PR post and of the PR gain over its experts,
    each with its min-max band across experts; with ``routing`` (a DataFrame of step, layer, load_cv, e.g.
    from the Trainer's ``nerve/<family>.<layer>/router/load_cv`` logs) the load imbalance too."""
    panels = [("pr_post", "PR post (mean over experts, min-max band)"), ("pr_gain", "PR gain (PR post / PR pre)")]
    has_routing = routing is not None and len(routing)
    figure = new_figure(4.4 * (len(panels) + bool(has_routing)), 3.4)
    axes = figure.subplots(1, len(panels) + bool(has_routing), squeeze=False).ravel()
    layers = sorted(set(summaries["layer"])) if len(summaries) else []
    colours = _colours(len(layers))
    for ax, (name, label) in zip(axes, panels):
        for colour, layer in zip(colours, layers):
            part = summaries[summaries["layer"] == layer].sort_values("step")
            ax.plot(part["step"], part[f"{name}_mean"], marker="o", ms=3, color=colour, label=f"layer {layer}")
            ax.fill_between(part["step"], part[f"{name}_min"], part[f"{name}_max"], color=colour, alpha=0.15)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        integer_axis(ax)
    if has_routing:
        ax = axes[-1]
        for colour, layer in zip(_colours(len(set(routing["layer"]))), sorted(set(routing["layer"]))):
            part = routing[routing["layer"] == layer].sort_values("step")
            ax.plot(part["step"], part["load_cv"], marker="o", ms=3, color=colour, label=f"layer {layer}")
        ax.set_title("load imbalance (CV of tokens per expert)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        integer_axis(ax)
    if layers:
        axes[0].legend(fontsize=6, ncol=2)
    figure.suptitle(f"routed experts: per-layer summaries over training ({split})")
    return figure


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(n - 1, 1)) for i in range(n)]  # short of the palest yellow


def routing_from_logs(log_history: list[dict], split: str) -> Optional[object]:
    """``step, layer, load_cv`` from the Trainer's ``[eval_]nerve/<family>.<layer>/router/load_cv`` log keys of
    ``split`` (None when there are none)."""
    import pandas as pd

    prefix = "nerve/" if split == "train" else f"{split}_nerve/"
    out = []
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith(prefix) and key.endswith("/router/load_cv") and "/mean/" not in key:
                site = key[len(prefix) : -len("/router/load_cv")]
                layer = site.rpartition(".")[2]
                if layer.isdigit() and value is not None and not math.isnan(float(value)):
                    out.append({"step": int(entry["step"]), "layer": int(layer), "load_cv": float(value)})
    return pd.DataFrame(out) if out else None


def collapse_experts(metrics):
    """``metrics`` (:attr:`~nerve_hf.analysis.runs.RunData.metrics`) with the routed experts' rows of each
    (split, step, MoE layer) replaced by one row, site ``"<family>.<layer>"``: ``tokens`` their sum, each metric
    the token-weighted mean over the experts that have it (what ``nerve/<family>.<layer>/<metric>_mean`` logs).
    Other rows are kept as they are; a run without experts is returned unchanged."""
    import pandas as pd

    if "kind" not in metrics or not (metrics["kind"] == "expert").any():
        return metrics
    is_expert = metrics["kind"] == "expert"
    experts = metrics[is_expert].assign(family=metrics.loc[is_expert, "site"].str.partition("[")[0])
    rows = []
    for (split, step, family, layer), group in experts.groupby(["split", "step", "family", "layer"], sort=False):
        row = {"step": step, "split": split, "site": f"{family}.{layer}", "layer": layer, "kind": "expert"}
        row.update(dim=group["dim"].iloc[0], tokens=group["tokens"].sum())
        for name in METRIC_NAMES:
            kept = group[group[name].notna()]
            weight = kept["tokens"].sum()
            row[name] = float((kept[name] * kept["tokens"]).sum() / weight) if weight else float("nan")
        rows.append(row)
    frame = pd.concat([metrics[~is_expert], pd.DataFrame(rows)[list(metrics.columns)]], ignore_index=True)
    return frame.sort_values(["split", "step", "layer", "site"], kind="stable").reset_index(drop=True)


def run_expert_figures(run, split: str, safe: str) -> dict:
    """``nerve report``'s expert figures of ``split`` for a run (:class:`~nerve_hf.analysis.runs.RunData`) whose
    records hold routed experts: ``experts_<safe>.png`` (the heatmaps of its last measurement) and
    ``expert_summaries_<safe>.png`` (the per-layer summaries over training); empty for runs without experts."""
    import json

    from nerve_hf.analysis.runs import _state_file
    from nerve_hf.sinks.records import RECORDS_FILENAME, scan_records

    path = run.run_dir / RECORDS_FILENAME
    if not path.is_file():
        return {}
    records = [r for r in expert_rows(scan_records(path).records) if r.get("split") == split]
    if not records:
        return {}
    last = max(int(r["step"]) for r in records)
    latest = [r for r in records if int(r["step"]) == last]
    figures = {f"experts_{safe}.png": plot_expert_heatmaps(latest, f"routed experts at step {last} ({split})")}
    state = _state_file(run.run_dir)
    history = json.loads(state.read_text(encoding="utf-8")).get("log_history", []) if state else []
    routing = routing_from_logs(history, split)
    figures[f"expert_summaries_{safe}.png"] = plot_expert_summaries(layer_summaries(records, split), split, routing)
    return figures
