"""Variance flow through the FFN block (``flow=True``): input -> pre -> post -> output.

Beside pre and post, the spectra of the FFN's d-wide **input** (the up/gate projection's input, the
normalised residual stream) and **output** (the down projection's output, before any dropout or
residual add), so a row reads input -> pre -> post -> output. Consecutive stages are compared by JS;
input -> pre and post -> output have different lengths (d and D), so JS is taken over the two
normalised spectra, sorted descending, the shorter one zero-padded to the longer length
(:func:`nerve_hf.metrics.padded_js`; a zero tail adds no mass, so this is the JS of the two
distributions over ranks).

:class:`StageCovariances` keeps a covariance of d-wide stages per site (the cross-layer measurement uses
one of the inputs alone); :class:`Flow` is the one of input and output that reports.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from nerve_hf.metrics import padded_js
from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.tracking.measurements.base import ComputeContext, Measurement, site_accumulator, standin_pair
from nerve_hf.tracking.site_table import SiteTable

__all__ = ["FLOW_STAGES", "FLOW_KEYS", "flow_values", "flow_names", "StageCovariances", "Flow"]

FLOW_STAGES = ("input", "pre", "post", "output")
# Row keys a report gains with flow=True, in column order (after the seven paper metrics).
FLOW_KEYS = (
    "dim_input",
    "se_input",
    "pr_input",
    "eee_input",
    "se_output",
    "pr_output",
    "eee_output",
    "js_input_pre",
    "js_post_output",
)


def flow_values(dim_input: int, io_values: dict[str, float], io_spectra, spectra) -> dict[str, float]:
    """The :data:`FLOW_KEYS` of one site: ``io_values`` are the metrics of the (input, output) pair as
    :func:`nerve_hf.spectra.metric_values` names them (``se_pre`` is the input's, ``se_post`` the
    output's); ``io_spectra`` (input, output) and ``spectra`` (pre, post) eigenvalues, or None."""
    io_spectra = io_spectra or (None, None)
    spectra = spectra or (None, None)
    return {
        "dim_input": int(dim_input),
        **{
            f"{metric}_{stage}": io_values[f"{metric}_{side}"]
            for stage, side in (("input", "pre"), ("output", "post"))
            for metric in ("se", "pr", "eee")
        },
        "js_input_pre": padded_js(io_spectra[0], spectra[0]),
        "js_post_output": padded_js(spectra[1], io_spectra[1]),
    }


def flow_names(rows: Sequence[dict]) -> list[str]:
    """The flow metrics every row carries (none without ``flow``): what the report logs and averages."""
    return [name for name in FLOW_KEYS[1:] if rows and all(name in row for row in rows)]


class StageCovariances(Measurement):
    """Per site, a covariance of each of ``stages`` (d-wide: ``"input"``, ``"output"``); reports nothing."""

    name = "stage_covariances"

    def __init__(self, stages: Sequence[str]) -> None:
        self.stages = tuple(stages)
        self.budget_terms = {"s": len(self.stages)}

    def bind(self, table: SiteTable) -> None:
        super().bind(table)
        self._accumulators: list[dict[str, CovarianceAccumulator]] = [{} for _ in table.sites]

    def accumulator(self, site: int, stage: str) -> Optional[CovarianceAccumulator]:
        """Site ``site``'s accumulator of ``stage``, once its width is known."""
        acc = self._accumulators[site].get(stage)
        width = self.table.stage_dims[site].get(stage)
        if acc is None and width is not None:
            acc = self._accumulators[site][stage] = site_accumulator(width, self.table.device)
        return acc

    def state_bytes(self, indices: Sequence[int]) -> int:
        widths = [self.table.stage_dims[i].get(stage) for i in indices for stage in self.stages]
        return sum((d * d + d) * 8 for d in widths if d is not None)

    def update(self, site: int, stage: str, rows: Tensor, keep: Optional[Tensor], positions) -> None:
        self.accumulator(site, stage).update(rows, keep)

    def reset(self) -> None:
        for accumulators in self._accumulators:
            for acc in accumulators.values():
                acc.reset()

    def accumulators(self, site: int) -> dict:
        return {stage: self.accumulator(site, stage) for stage in self.stages}


class Flow(StageCovariances):
    """``flow=True``: input and output covariances; each row gains :data:`FLOW_KEYS`, the report
    ``flow_eigenvalues`` (needs the pre/post measurement before it)."""

    name = "flow"

    def __init__(self) -> None:
        super().__init__(("input", "output"))

    def compute(self, report, context: ComputeContext) -> None:
        pairs = []
        for i in context.watched:
            x, y = self.accumulator(i, "input"), self.accumulator(i, "output")
            pairs.append((x, y) if x is not None and y is not None and x.dim == y.dim else standin_pair())
        measured = context.reducer.measure_pairs(pairs, context.metrics, context.spectra_dtype, context.watched)
        for row, i, row_values, io_spectra in zip(report.rows, context.watched, *measured[:2]):
            if self.accumulator(i, "input") is None:
                io_spectra = None
            dim_input = self.table.stage_dims[i].get("input") or 0
            row.update(flow_values(dim_input, row_values, io_spectra, report.eigenvalues.get(row["site"])))
            if io_spectra is not None:
                report.flow_eigenvalues[row["site"]] = io_spectra
