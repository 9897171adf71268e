"""The paper's measurement: per FFN, the covariance of its pre-activations and of its post-activations.

Each site keeps a (pre, post) pair of :class:`~nerve_hf.stats.covariance.CovarianceAccumulator` s, D wide;
the report gets one row per watched site (:data:`nerve_hf.report.ROW_KEYS`) and its (pre, post)
eigenvalues.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.tracking.budget import covariance_state_bytes
from nerve_hf.tracking.measurements.base import ComputeContext, Measurement, site_accumulator, standin_pair
from nerve_hf.tracking.site_table import SiteTable

__all__ = ["PrePost"]


class PrePost(Measurement):
    """Pre and post covariance per site; its :meth:`compute` adds the report's rows and eigenvalues."""

    name = "prepost"
    stages = ("pre", "post")

    def bind(self, table: SiteTable) -> None:
        super().bind(table)
        self._pairs: list[Optional[tuple[CovarianceAccumulator, CovarianceAccumulator]]] = [None] * len(table.sites)

    def pair(self, site: int) -> Optional[tuple[CovarianceAccumulator, CovarianceAccumulator]]:
        """Site ``site``'s (pre, post) accumulators, once its width is known (they hold no memory before
        their first rows)."""
        pair, dim = self._pairs[site], self.table.dims[site]
        if pair is None and dim is not None:
            pair = self._pairs[site] = (
                site_accumulator(dim, self.table.device),
                site_accumulator(dim, self.table.device),
            )
        return pair

    def state_bytes(self, indices: Sequence[int]) -> int:
        return covariance_state_bytes([self.table.dims[i] for i in indices if self.table.dims[i] is not None])

    def update(self, site: int, stage: str, rows: Tensor, keep: Optional[Tensor], positions) -> None:
        self.pair(site)[0 if stage == "pre" else 1].update(rows, keep)

    def reset(self) -> None:
        for pair in self._pairs:
            for acc in pair or ():
                acc.reset()

    def compute(self, report, context: ComputeContext) -> None:
        """One row per watched site; a site whose width is still unknown gets NaN metrics and 0 tokens."""
        watched, sites = context.watched, self.table.sites
        pairs = [self.pair(i) or standin_pair() for i in watched]
        values, kept, counts = context.reducer.measure_pairs(pairs, context.metrics, context.spectra_dtype, watched)
        for i, count, row_values, spectra in zip(watched, counts, values, kept):
            report.rows.append(
                {
                    "site": sites[i].site,
                    "layer": sites[i].layer,
                    "dim": int(self.table.dims[i] or 0),
                    "tokens": int(count),
                    **({"stack": sites[i].stack} if sites[i].stack else {}),  # models with several stacks
                    **row_values,
                    "kind": sites[i].kind,
                }
            )
            if spectra is not None:
                report.eigenvalues[sites[i].site] = spectra

    def accumulators(self, site: int) -> dict:
        pre, post = self.pair(site) or (None, None)
        return {"pre": pre, "post": post}
