"""Routed experts in a result file: per-expert series from ``nerve_metrics.jsonl`` rows of ``kind="expert"``,
the routing statistics of each MoE layer, and one token-weighted row per layer for the run's ``nerve`` series.

A run of a model with routed experts gets ``experts`` beside ``nerve`` (:func:`expert_series`)::

    {"steps": [S], "layers": [L], "experts": E, "dims": [L] (expert width F),
     "tokens": [S][L][E] (the (real token, expert) assignments routed to each expert),
     "per_expert": {metric: [S][L][E]} (None where an expert got too few tokens for a spectrum),
     "routing": {"dead_fraction" | "load_cv" | "load_entropy": [S][L]},
     "router_entropy": [S] (layer mean, from the callback's eval log; None where not logged)}

``dead_fraction`` is the share of a layer's experts with no assignment, ``load_cv`` the coefficient of
variation (population std / mean) of the assignments per expert and ``load_entropy`` the entropy (nats) of
their distribution over experts: the definitions of ``nerve_hf.tracking.measurements.experts``, recomputed
from the rows' token counts. Its ``nerve`` series (``_stats.nerve_series``) gets, per MoE layer, a site
``experts.{layer}`` whose metrics are the assignment-weighted means over the layer's experts with a value
(as the callback's ``*_mean`` log keys) and whose ``tokens`` are the layer's assignments.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable, Optional

from nerve_hf.metrics import METRIC_NAMES

ROUTER_ENTROPY_KEY = "eval_nerve/mean/experts/router/router_entropy"  # the callback's eval log key


def is_expert(record: dict) -> bool:
    return record.get("kind") == "expert"


def _finite(value) -> Optional[float]:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _grid(records: Iterable[dict], split: str) -> tuple[list[int], list[int], int, dict]:
    """``steps, layers, E, rows[(step, layer, expert)]`` of the expert rows of ``split``."""
    rows = {
        (int(r["step"]), int(r["layer"]), int(r["expert"])): r for r in records if is_expert(r) and r["split"] == split
    }
    steps = sorted({step for step, _, _ in rows})
    layers = sorted({layer for _, layer, _ in rows})
    n_experts = max((expert for _, _, expert in rows), default=-1) + 1
    return steps, layers, n_experts, rows


def load_statistics(tokens: list[float]) -> dict[str, Optional[float]]:
    """dead_fraction, load_cv and load_entropy of one layer's assignments per expert ``[E]``."""
    total = math.fsum(tokens)
    if not tokens or total <= 0:
        return {"dead_fraction": None, "load_cv": None, "load_entropy": None}
    mean = total / len(tokens)
    std = math.sqrt(math.fsum((t - mean) ** 2 for t in tokens) / len(tokens))
    entropy = -math.fsum(t / total * math.log(t / total) for t in tokens if t > 0)
    return {"dead_fraction": sum(t == 0 for t in tokens) / len(tokens), "load_cv": std / mean, "load_entropy": entropy}


def expert_series(records: list[dict], log_history: list[dict], split: str = "eval") -> Optional[dict]:
    """The ``experts`` entry of a run (module docstring), or None when the run has no expert rows."""
    steps, layers, n_experts, rows = _grid(records, split)
    if not rows:
        return None

    def cell(step, layer, expert, key):
        row = rows.get((step, layer, expert))
        return None if row is None else row.get(key)

    tokens = [
        [[int(cell(s, layer, e, "tokens") or 0) for e in range(n_experts)] for layer in layers] for s in steps
    ]  # [S][L][E]
    per_expert = {
        metric: [[[_finite(cell(s, layer, e, metric)) for e in range(n_experts)] for layer in layers] for s in steps]
        for metric in METRIC_NAMES
    }
    stats = [[load_statistics(per_layer) for per_layer in per_step] for per_step in tokens]  # [S][L]
    keys = ("dead_fraction", "load_cv", "load_entropy")
    routing = {key: [[layer[key] for layer in step] for step in stats] for key in keys}
    entropy_by_step = {int(log["step"]): log.get(ROUTER_ENTROPY_KEY) for log in log_history if "eval_loss" in log}
    dims = {layer: next(int(r["dim"]) for (_, lay, _), r in rows.items() if lay == layer) for layer in layers}
    return {
        "steps": steps,
        "layers": layers,
        "experts": n_experts,
        "dims": [dims[layer] for layer in layers],
        "tokens": tokens,
        "per_expert": per_expert,
        "routing": routing,
        "router_entropy": [_finite(entropy_by_step.get(step)) for step in steps],
    }


def layer_records(records: Iterable[dict]) -> list[dict]:
    """One record per (split, step, MoE layer): site ``experts.{layer}``, each metric the assignment-weighted
    mean over the layer's experts with a finite value, ``tokens`` the layer's assignments."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for record in records:
        if is_expert(record):
            groups[(record["split"], int(record["step"]), int(record["layer"]))].append(record)
    out = []
    for (split, step, layer), members in sorted(groups.items()):
        row = {
            "split": split,
            "step": step,
            "site": f"experts.{layer}",
            "layer": layer,
            "dim": int(members[0]["dim"]),
            "tokens": sum(int(r.get("tokens") or 0) for r in members),
            "kind": "experts_mean",
        }
        for metric in METRIC_NAMES:
            pairs = [(int(r["tokens"]), _finite(r.get(metric))) for r in members if r.get("tokens")]
            pairs = [(w, v) for w, v in pairs if v is not None]
            weight = sum(w for w, _ in pairs)
            row[metric] = math.fsum(w * v for w, v in pairs) / weight if weight else None
        out.append(row)
    return out


def series_records(records: list[dict]) -> list[dict]:
    """The records ``_stats.nerve_series`` reads: every non-expert record, and :func:`layer_records` of the
    expert rows."""
    return [r for r in records if not is_expert(r)] + layer_records(records)
