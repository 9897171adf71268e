"""Cross-layer coherence (``cross_layer="adjacent"`` or ``"all"``).

JS between the spectra of two layers (pre with pre, post with post, equal widths,
:func:`nerve_hf.metrics.js_divergence`), and linear CKA between their FFN inputs, which live in the
same d-wide residual basis, from a streaming
:class:`~nerve_hf.stats.cross_covariance.CrossCovarianceAccumulator` per pair (:class:`CrossLayer`).
The rows of one forward are the same tokens in every layer, so each layer's input rows are paired with
those of its earlier partners in the same forward.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from torch import Tensor

from nerve_hf.metrics import padded_js
from nerve_hf.sites import families, family, mean_name, next_sites
from nerve_hf.stats.cross_covariance import CrossCovarianceAccumulator, linear_cka
from nerve_hf.tracking.call_inputs import WarnOnce
from nerve_hf.tracking.measurements.base import ComputeContext, Measurement, merge_skipped, nan_mean
from nerve_hf.tracking.measurements.flow import StageCovariances
from nerve_hf.tracking.site_table import SiteTable

__all__ = ["CROSS_LAYER_KEYS", "CROSS_LAYER_CHOICES", "layer_pairs", "cross_layer_log_dict", "CrossLayer"]

# Keys of each row of SpectralReport.cross_layer, in column order.
CROSS_LAYER_KEYS = ("site_a", "site_b", "layer_a", "layer_b", "tokens", "js_pre", "js_post", "cka")
CROSS_LAYER_CHOICES = ("adjacent", "all")


def layer_pairs(sites, mode: Optional[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j), i before j, of tracked sites of the same family: consecutive tracked layers
    (``"adjacent"``) or every pair (``"all"``); ``None``: none."""
    if mode is None:
        return []
    if mode not in CROSS_LAYER_CHOICES:
        raise ValueError(f"cross_layer must be one of {CROSS_LAYER_CHOICES} or None, got {mode!r}")
    families: dict[str, list[int]] = {}
    for index, site in enumerate(sites):
        families.setdefault(site.family, []).append(index)
    pairs = []
    for members in families.values():
        members = sorted(members, key=lambda i: sites[i].layer)
        if mode == "adjacent":
            pairs.extend(zip(members, members[1:]))
        else:
            pairs.extend((a, b) for k, a in enumerate(members) for b in members[k + 1 :])
    return pairs


def cross_layer_log_dict(
    rows: Sequence[dict], cross_rows: Sequence[dict], prefix: str, means: Optional[dict[str, str]] = None
) -> dict[str, float]:
    """Log keys of ``SpectralReport.cross_layer``: for each layer and the next tracked one (``rows`` say
    which that is), ``{prefix}/{site}/cka_next``, ``js_pre_next``, ``js_post_next``, and their means over each
    family (``{prefix}/mean/cka_next``; a model with several: ``{prefix}/mean/{family}/cka_next``); ``means``: as
    :func:`~nerve_hf.tracking.measurements.positions.position_log_dict`'s."""
    following = next_sites(rows)
    adjacent = [row for row in cross_rows if following.get(row["site_a"]) == row["site_b"]]
    out = {}
    for row in adjacent:
        for name in ("cka", "js_pre", "js_post"):
            out[f"{prefix}/{row['site_a']}/{name}_next"] = row[name]
    all_families = families(row["site_a"] for row in adjacent)
    for site_family in all_families:
        members = [row for row in adjacent if family(row["site_a"]) == site_family]
        mean = (means or {}).get(site_family) or mean_name(site_family, all_families)
        for name in ("cka", "js_pre", "js_post"):
            out[f"{prefix}/{mean}/{name}_next"] = nan_mean(row[name] for row in members)
    return out


class CrossLayer(Measurement):
    """A cross-covariance of the FFN inputs of each site pair in ``pairs`` (:func:`layer_pairs`), beside
    each site's input covariance: ``inputs`` (the flow measurement's, shared) or its own.
    ``report.cross_layer`` rows; needs the pre/post measurement before it (JS of their spectra)."""

    name = "cross_layer"
    stages = ("input",)

    def __init__(self, pairs: Sequence[tuple[int, int]], inputs: Optional[StageCovariances] = None) -> None:
        self.pairs = list(pairs)
        self._own_inputs = inputs is None
        self.inputs = StageCovariances(("input",)) if inputs is None else inputs
        self.budget_terms = dict(self.inputs.budget_terms) if self._own_inputs else {}
        self.cross: dict[tuple[int, int], CrossCovarianceAccumulator] = {}  # allocated on first rows
        self._partners: dict[int, list[int]] = {}
        self._rows: dict[int, Tensor] = {}  # site -> its input rows in the running forward
        self._warn_once = WarnOnce()

    def bind(self, table: SiteTable) -> None:
        super().bind(table)
        if self._own_inputs:
            self.inputs.bind(table)
        self._partners = {i: [b for a, b in self.pairs if a == i] for i in range(len(table.sites))}

    def state_bytes(self, indices: Sequence[int]) -> int:
        total = self.inputs.state_bytes(indices) if self._own_inputs else 0
        chosen, widths = set(indices), self.table.stage_dims
        for a, b in self.pairs:
            da, db = widths[a].get("input"), widths[b].get("input")
            if a in chosen and b in chosen and da is not None and db is not None:
                total += (da * db + da + db) * 8
        return total

    def update(self, site: int, stage: str, rows: Tensor, keep: Optional[Tensor], positions) -> None:
        """Pair this site's input rows with those of its earlier partners in this forward."""
        if self._own_inputs:
            self.inputs.update(site, stage, rows, keep, positions)
        if keep is not None:
            rows = rows[keep]  # [N, d]; a host sync, paid only with cross_layer
        for pair in [(a, b) for a, b in self.pairs if b == site and a in self._rows]:
            earlier = self._rows[pair[0]]
            if earlier.shape[0] != rows.shape[0]:
                self._warn_once(
                    "cross-rows",
                    f"FFNTracker: the FFN inputs of {self.table.sites[pair[0]].site} and {self.table.sites[site].site} "
                    f"hold different rows ({earlier.shape[0]} and {rows.shape[0]}); that pair is not updated",
                )
                continue
            self._cross_for(pair, earlier.shape[1], rows.shape[1]).update(earlier, rows)
            if max(self._partners[pair[0]], key=lambda j: self.table.sites[j].layer) == site:
                del self._rows[pair[0]]  # no later partner: its rows are not needed again
        if self._partners[site]:
            self._rows[site] = rows.clone()  # a copy: the model may later change its activations in place

    def _cross_for(self, pair: tuple[int, int], dim_x: int, dim_y: int) -> CrossCovarianceAccumulator:
        acc = self.cross.get(pair)
        if acc is None:
            acc = self.cross[pair] = CrossCovarianceAccumulator(dim_x, dim_y, self.table.device)
        return acc

    def skipped_rows(self, site: int) -> dict[str, int]:
        """Its own input covariances' skipped rows, and per pair ending at ``site`` the row pairs skipped
        because either input row held NaN or Inf."""
        own = self.inputs.skipped_rows(site) if self._own_inputs else {}
        pairs = {
            f"input paired with {self.table.sites[a].site}": cross.skipped
            for (a, b), cross in self.cross.items()
            if b == site
        }
        return merge_skipped([own, pairs])

    def end_forward(self) -> None:
        self._rows = {}

    def reset(self) -> None:
        if self._own_inputs:
            self.inputs.reset()
        for acc in self.cross.values():
            acc.reset()

    def compute(self, report, context: ComputeContext) -> None:
        """JS between the two layers' spectra and linear CKA of their FFN inputs, per watched pair."""
        kept = set(context.watched)
        chosen = [(a, b) for a, b in self.pairs if a in kept and b in kept]
        inputs = [self.inputs.accumulator(i, "input") for i in range(len(self.table.sites))]
        measured = [
            self._cross_for((a, b), inputs[a].dim, inputs[b].dim)
            if inputs[a] is not None and inputs[b] is not None
            else None  # widths not known yet: nothing recorded
            for a, b in chosen
        ]
        context.reducer.sync_cross([cross for cross in measured if cross is not None])
        involved = sorted({i for (a, b), cross in zip(chosen, measured) if cross is not None for i in (a, b)})
        context.reducer.sync([inputs[i] for i in involved])
        for (a, b), cross in zip(chosen, measured):
            site_a, site_b = self.table.sites[a], self.table.sites[b]
            cka, tokens = math.nan, 0
            if cross is not None:
                tokens = cross.count
                x, y = inputs[a], inputs[b]
                if tokens >= 2 and x.count == tokens and y.count == tokens:  # the same tokens in all three
                    cka = linear_cka(cross.cross_covariance(), x.covariance(), y.covariance())
            eig_a, eig_b = report.eigenvalues.get(site_a.site), report.eigenvalues.get(site_b.site)
            report.cross_layer.append(
                {
                    "site_a": site_a.site,
                    "site_b": site_b.site,
                    "layer_a": site_a.layer,
                    "layer_b": site_b.layer,
                    "tokens": int(tokens),
                    "js_pre": padded_js(eig_a[0], eig_b[0]) if eig_a and eig_b else math.nan,
                    "js_post": padded_js(eig_a[1], eig_b[1]) if eig_a and eig_b else math.nan,
                    "cka": cka,
                }
            )
