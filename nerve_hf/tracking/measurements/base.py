"""The measurement protocol, and the collection of one window's measurements.

A measurement is one feature of a tracker (the pre/post pair, flow, position buckets, cross-layer, or
one of your own). It subscribes to hook stages (``input``, ``pre``, ``post``, ``output``), keeps its
own state for one window, receives the rows that count, and adds its part to the report:

>>> import torch
>>> from torch import nn
>>> from nerve_hf import FFNTracker
>>> class RowCount(Measurement):
...     name, stages = "row_count", ("pre",)
...     def bind(self, table):
...         super().bind(table)
...         self.counts = [0] * len(table.sites)
...     def update(self, site, stage, rows, keep, positions):
...         self.counts[site] += rows.shape[0] if keep is None else int(keep.sum())
...     def reset(self):
...         self.counts = [0] * len(self.counts)
...     def compute(self, report, context):
...         for row, i in zip(report.rows, context.watched):
...             row["pre_rows"] = self.counts[i]
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc1, self.act, self.fc2 = nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 4)
...     def forward(self, x):
...         return x + self.fc2(self.act(self.fc1(x)))
>>> model = nn.Sequential(Block(), Block())
>>> tracker = FFNTracker(model, measurements=[RowCount])
>>> with tracker:
...     _ = model(torch.randn(3, 5, 4))
>>> rows = tracker.compute().rows
>>> list(zip(*[(row["site"], row["tokens"], row["pre_rows"]) for row in rows]))
[('ffn.0', 'ffn.1'), (15, 15), (15, 15)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional, Sequence

from torch import Tensor

from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.tracking.site_table import SiteTable

__all__ = [
    "Measurement",
    "MeasurementCollection",
    "ComputeContext",
    "standin_pair",
    "nan_mean",
    "site_accumulator",
    "merge_skipped",
]

# A zero-argument function giving the position of each row handed to update() ([N] int64), or None.
Positions = Callable[[], Optional[Tensor]]


@dataclass
class ComputeContext:
    """What :meth:`Measurement.compute` needs besides its own state.

    Attributes:
        table: the sites and their widths.
        watched: indices of the sites the window watches, in report order (``report.rows[k]`` is site
            ``watched[k]`` once the pre/post measurement has added its rows).
        reducer: the tracker's :class:`~nerve_hf.tracking.reducers.Reducer` (cross-process reduction).
        metrics, spectra_dtype: as :func:`nerve_hf.spectra.metric_values` takes them.
    """

    table: SiteTable
    watched: list[int]
    reducer: object
    metrics: str
    spectra_dtype: str


class Measurement:
    """One feature of a tracker window (torchmetrics' ``Metric`` is the idea).

    Subclasses set :attr:`name` and :attr:`stages`, and override :meth:`update`, :meth:`reset` and
    :meth:`compute`; :meth:`state_bytes` feeds ``memory_budget_mb``. One instance serves one window.
    """

    name: str = "measurement"
    stages: tuple[str, ...] = ()  # hook stages it needs: a subset of ("input", "pre", "post", "output", "experts")
    kinds: tuple[str, ...] = ("dense", "shared_expert")  # the kinds of site it measures (ResolvedSite.kind)
    budget_terms: dict[str, int] = {}  # numbers the memory budget's message quotes (e.g. {"B": 3})

    def bind(self, table: SiteTable) -> None:
        """Called once by the tracker with its sites, before any row arrives."""
        self.table = table

    def state_bytes(self, indices: Sequence[int]) -> int:
        """Bytes of state this measurement keeps for sites ``indices`` (widths known so far)."""
        return 0

    def update(self, site: int, stage: str, rows: Tensor, keep: Optional[Tensor], positions: Positions) -> None:
        """Rows ``[N, W]`` of ``stage`` at site index ``site``; ``keep`` ``[N]`` bool (rows that count) or
        None (all do); ``positions()`` their token positions ``[N]`` (computed on the first call)."""

    def end_forward(self) -> None:
        """The recorded top-level forward ended (or the hooks were removed)."""

    def wanted_experts(self, site: int) -> Optional[set[int]]:
        """For the ``experts`` stage: the experts of site ``site`` whose rows it needs now (None: all)."""
        return None

    def reset(self) -> None:
        """Forget every row."""

    def compute(self, report, context: ComputeContext) -> None:
        """Add this measurement's part to ``report`` (a :class:`~nerve_hf.report.SpectralReport`)."""

    def accumulators(self, site: int) -> dict:
        """Named accumulators of site index ``site`` (for inspection: ``Window.states``)."""
        return {}

    def skipped_rows(self, site: int) -> dict[str, int]:
        """Rows of site index ``site`` left out of this measurement's statistics because they held NaN or
        Inf, by what they are (a stage name such as ``"pre"``): by default the ``skipped`` count of each
        accumulator :meth:`accumulators` names (those without one are ignored)."""
        named = self.accumulators(site).items()
        return {name: acc.skipped for name, acc in named if isinstance(getattr(acc, "skipped", None), int)}


class MeasurementCollection:
    """One window's measurements, composed (torchmetrics' ``MetricCollection`` is the idea): rows of a
    stage go to the measurements that subscribed to it, reports are assembled in order."""

    def __init__(self, measurements: Sequence[Measurement], table: SiteTable) -> None:
        names = [m.name for m in measurements]
        if len(set(names)) != len(names):
            raise ValueError(f"measurements need distinct names, got {names}")
        self.measurements = list(measurements)
        for measurement in self.measurements:
            measurement.bind(table)
        self.table = table
        self.by_stage = {
            stage: [m for m in self.measurements if stage in m.stages]
            for stage in ("input", "pre", "post", "output", "experts")
        }

    def _of_kinds(self, measurement: Measurement, indices: Sequence[int]) -> list[int]:
        """The sites among ``indices`` whose kind ``measurement`` measures."""
        return [i for i in indices if self.table.sites[i].kind in measurement.kinds]

    @property
    def stages(self) -> set[str]:
        """The stages some measurement subscribed to."""
        return {stage for stage, subscribed in self.by_stage.items() if subscribed}

    def get(self, name: str) -> Optional[Measurement]:
        return next((m for m in self.measurements if m.name == name), None)

    def update(self, site: int, stage: str, rows: Tensor, keep: Optional[Tensor], positions: Positions) -> None:
        for measurement in self.by_stage[stage]:
            measurement.update(site, stage, rows, keep, positions)

    def end_forward(self) -> None:
        for measurement in self.measurements:
            measurement.end_forward()

    def experts_wanted(self, site: int) -> Optional[set[int]]:
        """The experts of site ``site`` some ``experts``-stage measurement needs (None: all)."""
        wanted: set[int] = set()
        for measurement in self.by_stage["experts"]:
            experts = measurement.wanted_experts(site)
            if experts is None:
                return None
            wanted |= experts
        return wanted

    def reset(self) -> None:
        for measurement in self.measurements:
            measurement.reset()

    def state_bytes(self, indices: Sequence[int]) -> int:
        return sum(measurement.state_bytes(self._of_kinds(measurement, indices)) for measurement in self.measurements)

    def compute(self, report, context: ComputeContext) -> None:
        """Each measurement computes over the watched sites of the kinds it measures."""
        for measurement in self.measurements:
            measurement.compute(report, replace(context, watched=self._of_kinds(measurement, context.watched)))

    def accumulators(self, site: int) -> dict:
        merged: dict = {}
        for measurement in self.measurements:
            merged.update(measurement.accumulators(site))
        return merged

    def skipped_rows(self, indices: Sequence[int]) -> dict[int, dict[str, int]]:
        """Site index -> {what: rows skipped} for the sites among ``indices`` that skipped any (as far as
        this process saw them); measurements that saw the same rows (pre/post and its position buckets)
        count them once: the largest count per name is kept."""
        out: dict[int, dict[str, int]] = {}
        for i in indices:
            measuring = [m for m in self.measurements if self._of_kinds(m, [i])]
            counts = merge_skipped(measurement.skipped_rows(i) for measurement in measuring)
            if counts:
                out[i] = counts
        return out


def site_accumulator(dim: int, device=None) -> CovarianceAccumulator:
    """A measurement's covariance of ``dim``-wide rows: it counts skipped non-finite rows silently (the
    tracker warns once per measurement for all of them, :meth:`Measurement.skipped_rows`)."""
    return CovarianceAccumulator(dim, device, warn_nonfinite=False)


def merge_skipped(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """The non-zero skipped counts of several ``{what: rows}``, the largest per name.

    >>> merge_skipped([{"pre": 2, "post": 0}, {"pre": 1, "input": 3}])
    {'pre': 2, 'input': 3}
    """
    merged: dict[str, int] = {}
    for part in counts:
        for name, rows in part.items():
            if rows:
                merged[name] = max(rows, merged.get(name, 0))
    return merged


def standin_pair() -> tuple[CovarianceAccumulator, CovarianceAccumulator]:
    """Empty width-1 accumulators for a site whose widths are unknown: NaN metrics, 0 tokens."""
    return site_accumulator(1), site_accumulator(1)


def nan_mean(values) -> float:
    """Mean of the values that are not NaN (NaN if none is)."""
    kept = [value for value in values if not math.isnan(value)]
    return math.fsum(kept) / len(kept) if kept else float("nan")
