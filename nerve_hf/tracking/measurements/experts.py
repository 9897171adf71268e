"""Routed experts: per expert, the covariance of its pre and post over the real assignments routed to it,
and per MoE layer the routing statistics of the same calls.

Rows (one per measured expert, :data:`nerve_hf.report.ROW_KEYS` plus ``kind="expert"`` and ``expert``)
are named ``f"{family}[{expert}].{layer}"`` (``experts[5].3``); ``tokens`` counts the (real token, expert)
assignments. ``report.routing`` gets one row per MoE layer (:data:`ROUTING_KEYS`):

* ``tokens``: real tokens; ``assignments``: real (token, expert) pairs (= tokens × top-k);
* ``dead_fraction``: the share of the layer's experts that received no assignment;
* ``load_cv``: coefficient of variation (population std / mean) of the assignments per expert;
* ``router_entropy``: mean over real tokens of the entropy (nats) of their top-k router weights,
  normalised to sum to 1 (the experts module sees only the top-k weights);
* ``load_entropy``: entropy (nats) of the assignments' distribution over experts (``ln E`` when balanced);
* ``assignments_per_expert``: the list, expert by expert.

State: ``2 × (F² + F) × 8`` bytes per measured expert (allocated at its first rows), ``E × 8`` per layer for
the routing counts. ``experts`` (a subset of expert indices) or ``experts_per_step`` (a share of the
experts per measurement window, the next share at the first :meth:`reset` after a :meth:`compute`, like
``layers_per_step``) bound it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.tracking.budget import covariance_state_bytes
from nerve_hf.tracking.experts_compute import ExpertsLayout
from nerve_hf.tracking.measurements.base import ComputeContext, Measurement, site_accumulator
from nerve_hf.tracking.site_table import SiteTable

__all__ = ["Experts", "ExpertRangeError", "ROUTING_KEYS", "experts_log_dict", "SUMMARY_METRICS"]

ROUTING_KEYS = (
    "site", "layer", "experts", "tokens", "assignments", "dead_fraction", "load_cv", "router_entropy", "load_entropy",
)  # fmt: skip
# The per-layer summaries over experts: every metric and the PR gain pr_post / pr_pre.
SUMMARY_METRICS = (*METRIC_NAMES, "pr_gain")


class ExpertRangeError(ValueError):
    """``experts`` names an expert index an MoE layer of the model does not have."""


def _check_experts(experts, experts_per_step) -> tuple[Optional[tuple[int, ...]], Optional[int]]:
    if experts is not None and experts_per_step is not None:
        raise ValueError("pass experts (a subset) or experts_per_step (a round-robin share), not both")
    if experts is not None:
        experts = tuple(experts)
        if not experts or any(not isinstance(e, int) or isinstance(e, bool) or e < 0 for e in experts):
            raise ValueError(f"experts must be a non-empty list of expert indices (ints >= 0), got {list(experts)}")
        experts = tuple(sorted(set(experts)))
    if experts_per_step is not None and (
        not isinstance(experts_per_step, int) or isinstance(experts_per_step, bool) or experts_per_step < 1
    ):
        raise ValueError(f"experts_per_step must be a positive int, got {experts_per_step!r}")
    return experts, experts_per_step


class Experts(Measurement):
    """Per-expert (pre, post) covariances and per-layer routing counts of the routed-experts sites.

    Args:
        experts: measure only these expert indices (in every MoE layer); None: all.
        experts_per_step: measure a share of this many experts per window, the next share at the first
            :meth:`reset` after a :meth:`compute` (resets that only start a window keep it); None: all at once.
    """

    name = "experts"
    stages = ("experts",)
    kinds = ("expert",)

    def __init__(self, experts: Optional[Sequence[int]] = None, experts_per_step: Optional[int] = None) -> None:
        self.subset, self.per_step = _check_experts(experts, experts_per_step)
        self.turn = 0
        self._reported = False  # compute() ran since the last reset

    def bind(self, table: SiteTable) -> None:
        super().bind(table)
        self.sizes: dict[int, int] = {}  # site -> E
        for i, site in enumerate(table.sites):
            if site.kind == "expert":
                self.sizes[i] = ExpertsLayout.of(site.post, site.experts).sizes(site.post)[0]
                if self.subset is not None and self.subset[-1] >= self.sizes[i]:
                    raise ExpertRangeError(
                        f"experts={list(self.subset)}: {site.site} has {self.sizes[i]} experts (0..{self.sizes[i] - 1})"
                    )
        self._pairs: dict[tuple[int, int], tuple[CovarianceAccumulator, CovarianceAccumulator]] = {}
        self._routing: dict[int, torch.Tensor] = {}  # site -> [E + 2] float64: assignments, tokens, entropy sum

    def measured(self, site: int) -> list[int]:
        """The experts of site ``site`` measured in this window."""
        count = self.sizes[site]
        if self.subset is not None:
            return list(self.subset)
        if self.per_step is None or self.per_step >= count:
            return list(range(count))
        groups = math.ceil(count / self.per_step)
        start = (self.turn % groups) * self.per_step
        return list(range(start, min(start + self.per_step, count)))

    def wanted_experts(self, site: int) -> Optional[set[int]]:
        return set(self.measured(site))

    def _pair(self, site: int, expert: int) -> tuple[CovarianceAccumulator, CovarianceAccumulator]:
        pair = self._pairs.get((site, expert))
        if pair is None:
            dim = self.table.dims[site]
            pair = self._pairs[(site, expert)] = (
                site_accumulator(dim, self.table.device),
                site_accumulator(dim, self.table.device),
            )
        return pair

    def state_bytes(self, indices: Sequence[int]) -> int:
        """``2 × (F² + F) × 8`` per expert of the largest share, plus the routing counts."""
        total = 0
        for i in indices:
            share = len(self.subset) if self.subset is not None else min(self.per_step or self.sizes[i], self.sizes[i])
            total += covariance_state_bytes([self.table.dims[i]] * share) + (self.sizes[i] + 2) * 8
        return total

    def update(self, site: int, stage: str, rows, keep, positions) -> None:
        """``rows``: an :class:`~nerve_hf.tracking.experts_compute.ExpertRows`."""
        wanted = set(self.measured(site))
        for expert, pre in rows.pre.items():
            if expert in wanted:
                pre_acc, post_acc = self._pair(site, expert)
                pre_acc.update(pre)
                post_acc.update(rows.post[expert])
        routing = self._routing.get(site)
        if routing is None:
            routing = self._routing[site] = torch.zeros(self.sizes[site] + 2, dtype=torch.float64)
        routing[:-2] += rows.assignments
        routing[-2] += rows.tokens
        routing[-1] += rows.entropy

    def reset(self) -> None:
        for pair in self._pairs.values():
            for acc in pair:
                acc.reset()
        self._routing = {}
        if self._reported:  # the next share of experts (experts_per_step), once this one was computed: a
            self.turn += 1  # reset that starts a window (the callback's, at a measured step) keeps the share
        self._reported = False

    def compute(self, report, context: ComputeContext) -> None:
        """One row per measured expert of every watched MoE layer, and one routing row per layer."""
        self._reported = True
        for i in context.watched:
            site = self.table.sites[i]
            experts = self.measured(i)
            pairs = [self._pair(i, e) for e in experts]
            values, kept, counts = context.reducer.measure_pairs(
                pairs, context.metrics, context.spectra_dtype, [i] * len(pairs)
            )
            for expert, count, row_values, spectra in zip(experts, counts, values, kept):
                name = f"{site.family}[{expert}].{site.layer}"
                report.rows.append(
                    {
                        "site": name,
                        "layer": site.layer,
                        "dim": int(self.table.dims[i]),
                        "tokens": int(count),
                        **row_values,
                        "kind": "expert",
                        "expert": expert,
                        **({"stack": site.stack} if site.stack else {}),  # models with several stacks
                    }
                )
                if spectra is not None:
                    report.eigenvalues[name] = spectra
            routing = self._routing.get(i, torch.zeros(self.sizes[i] + 2, dtype=torch.float64))
            report.routing.append(routing_row(site.site, site.layer, context.reducer.sum(routing.clone())))

    def accumulators(self, site: int) -> dict:
        return {f"expert{e}": pair for (i, e), pair in self._pairs.items() if i == site}

    def skipped_rows(self, site: int) -> dict[str, int]:
        """(token, expert) assignments skipped, summed over the site's experts, per stage."""
        pairs = [pair for (i, _), pair in self._pairs.items() if i == site]
        pre, post = sum(pre.skipped for pre, _ in pairs), sum(post.skipped for _, post in pairs)
        return {"expert pre": pre, "expert post": post}


def routing_row(site: str, layer: int, routing: torch.Tensor) -> dict:
    """The routing statistics of one layer from its summed ``[E + 2]`` counts (assignments, tokens, entropy)."""
    load, tokens, entropy = routing[:-2].double().cpu(), float(routing[-2]), float(routing[-1])
    total = float(load.sum())
    share = load / total if total else load
    nonzero = share[share > 0]
    return {
        "site": site,
        "layer": layer,
        "experts": int(load.numel()),
        "tokens": int(tokens),
        "assignments": int(total),
        "dead_fraction": float((load == 0).double().mean()),
        "load_cv": float(load.std(unbiased=False) / load.mean()) if total else float("nan"),
        "router_entropy": entropy / tokens if tokens else float("nan"),
        "load_entropy": float(-(nonzero * nonzero.log()).sum()) if total else float("nan"),
        "assignments_per_expert": [int(v) for v in load.tolist()],
    }


def _weighted(rows: list[dict], name: str) -> tuple[float, float, float]:
    """(token-weighted mean, min, max) of ``name`` over rows where it is defined (NaN if none)."""
    pairs = [(row[name], row["tokens"]) for row in rows if not math.isnan(row[name])]
    if not pairs:
        return (float("nan"),) * 3
    weight = sum(t for _, t in pairs)
    mean = math.fsum(v * t for v, t in pairs) / weight if weight else float("nan")
    values = [v for v, _ in pairs]
    return mean, min(values), max(values)


def expert_summaries(rows: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """(family, layer) -> ``{f"{metric}_{mean|min|max}": value}`` over the layer's expert rows."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if row.get("kind") == "expert":
            family = row["site"].partition("[")[0]
            with_gain = {**row, "pr_gain": row["pr_post"] / row["pr_pre"] if row["pr_pre"] else float("nan")}
            groups.setdefault((family, row["layer"]), []).append(with_gain)
    out = {}
    for key, members in groups.items():
        out[key] = {}
        for name in SUMMARY_METRICS:
            mean, low, high = _weighted(members, name)
            out[key].update({f"{name}_mean": mean, f"{name}_min": low, f"{name}_max": high})
    return out


def experts_log_dict(rows: list[dict], routing: list[dict], prefix: str) -> dict[str, float]:
    """Per MoE layer ``{prefix}/{family}.{layer}/{metric}_{mean|min|max}`` over its experts and the routing
    statistics ``{prefix}/{family}.{layer}/router/{stat}``; their layer means under
    ``{prefix}/mean/{family}/{metric}_mean`` and ``{prefix}/mean/{family}/router/{stat}``."""
    out: dict[str, float] = {}
    summaries = expert_summaries(rows)
    for (family, layer), values in summaries.items():
        out.update({f"{prefix}/{family}.{layer}/{name}": value for name, value in values.items()})
    for family in sorted({family for family, _ in summaries}):
        layers = [values for (fam, _), values in summaries.items() if fam == family]
        for name in SUMMARY_METRICS:
            kept = [v[f"{name}_mean"] for v in layers if not math.isnan(v[f"{name}_mean"])]
            out[f"{prefix}/mean/{family}/{name}_mean"] = math.fsum(kept) / len(kept) if kept else float("nan")
    stats = ("dead_fraction", "load_cv", "router_entropy", "load_entropy")
    families: dict[str, list[dict]] = {}
    for row in routing:
        family = row["site"].rpartition(".")[0]
        families.setdefault(family, []).append(row)
        out.update({f"{prefix}/{row['site']}/router/{stat}": float(row[stat]) for stat in stats})
        out[f"{prefix}/{row['site']}/router/tokens"] = float(row["tokens"])
    for family, members in families.items():
        for stat in stats:
            kept = [row[stat] for row in members if not math.isnan(row[stat])]
            out[f"{prefix}/mean/{family}/router/{stat}"] = math.fsum(kept) / len(kept) if kept else float("nan")
    return out
