"""Position buckets (``position_buckets=[0, 16, 64, ...]``): metrics per bucket of token positions.

Rows of metrics per bucket of token positions [e_i, e_{i+1}) (the last bucket is open), from one
(pre, post) accumulator pair per bucket (:class:`PositionBuckets`). A row's position comes from the
site's token source (:meth:`nerve_hf.tracking.tokens.TokenSource.positions`); rows without one are left out.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.options import is_integer
from nerve_hf.sites import families, family, mean_name
from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.tracking.budget import covariance_state_bytes
from nerve_hf.tracking.measurements.base import ComputeContext, Measurement, nan_mean, site_accumulator, standin_pair
from nerve_hf.tracking.site_table import SiteTable

__all__ = [
    "POSITION_KEYS",
    "check_buckets",
    "position_bucket_list",
    "bucket_labels",
    "position_log_dict",
    "PositionBuckets",
]

# Keys of each row of SpectralReport.positions, in column order.
POSITION_KEYS = ("site", "layer", "bucket", "position_start", "position_end", "dim", "tokens") + METRIC_NAMES


def check_buckets(edges) -> Optional[tuple[int, ...]]:
    """``position_buckets`` as a tuple of strictly increasing non-negative integers (None stays None)."""
    if edges is None:
        return None
    if isinstance(edges, (str, bytes)) or not hasattr(edges, "__iter__"):
        raise TypeError(f"position_buckets must be a list of integers such as [0, 16, 64], got {edges!r}")
    edges = list(edges)  # a 1-D NumPy array too: its items are NumPy integers
    if not edges or not all(is_integer(e) for e in edges):
        raise TypeError(f"position_buckets must be a non-empty list of integers such as [0, 16, 64], got {edges!r}")
    edges = [int(e) for e in edges]
    if edges[0] < 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(
            f"position_buckets must be strictly increasing non-negative positions such as [0, 16, 64], got {edges!r}"
        )
    return tuple(edges)


def position_bucket_list(name: str, value) -> list[int]:
    """Option check of ``position_buckets`` (``NerveConfig``, ``ProbeConfig``): :func:`check_buckets` as a
    list, its errors naming the option."""
    from nerve_hf.options import OptionTypeError, OptionValueError

    requirement = "a list of strictly increasing non-negative integers such as [0, 16, 64]"
    try:
        return list(check_buckets(value))
    except TypeError:
        raise OptionTypeError(name, requirement, value) from None
    except ValueError:
        raise OptionValueError(name, requirement, value) from None


def bucket_labels(edges: Sequence[int]) -> list[tuple[str, int, Optional[int]]]:
    """(label, start, end) of each bucket [start, end); the last is open (end None, label ``"<start>-inf"``).

    >>> bucket_labels([0, 16, 64])
    [('0-16', 0, 16), ('16-64', 16, 64), ('64-inf', 64, None)]
    """
    ends = list(edges[1:]) + [None]
    return [(f"{start}-{'inf' if end is None else end}", start, end) for start, end in zip(edges, ends)]


def position_log_dict(rows: Sequence[dict], prefix: str, means: Optional[dict[str, str]] = None) -> dict[str, float]:
    """Log keys of ``SpectralReport.positions``: ``{prefix}/{site}/{metric}.pos{bucket}`` and the layer
    mean over each family of sites ``{prefix}/mean/{metric}.pos{bucket}`` (a model with several families:
    ``{prefix}/mean/{family}/{metric}.pos{bucket}``, :func:`~nerve_hf.sites.mean_name`); ``means``: family -> the
    name of its mean where the caller knows better (the report: ``mean/shared_expert`` beside ``mean``)."""
    out: dict[str, float] = {}
    buckets: dict[tuple[str, str], list[dict]] = {}
    all_families = families(row["site"] for row in rows)
    for row in rows:
        buckets.setdefault((row["bucket"], family(row["site"])), []).append(row)
        for name in METRIC_NAMES:
            out[f"{prefix}/{row['site']}/{name}.pos{row['bucket']}"] = row[name]
    for (bucket, site_family), members in buckets.items():
        mean = (means or {}).get(site_family) or mean_name(site_family, all_families)
        for name in METRIC_NAMES:
            out[f"{prefix}/{mean}/{name}.pos{bucket}"] = nan_mean(row[name] for row in members)
    return out


class PositionBuckets(Measurement):
    """One (pre, post) accumulator pair per site and bucket of ``edges``; ``report.positions`` rows and
    ``report.position_eigenvalues``."""

    name = "positions"
    stages = ("pre", "post")

    def __init__(self, edges: Sequence[int]) -> None:
        self.edges = check_buckets(edges)
        self.labels = bucket_labels(self.edges)
        self.budget_terms = {"B": len(self.edges)}

    def bind(self, table: SiteTable) -> None:
        super().bind(table)
        self._buckets: list[list[tuple[CovarianceAccumulator, CovarianceAccumulator]]] = [[] for _ in table.sites]
        self._edges: dict[torch.device, Tensor] = {}  # the edges on each device

    def buckets(self, site: int) -> list[tuple[CovarianceAccumulator, CovarianceAccumulator]]:
        """Site ``site``'s (pre, post) pair per bucket, once its width is known (else empty)."""
        dim = self.table.dims[site]
        if not self._buckets[site] and dim is not None:
            device = self.table.device
            self._buckets[site] = [(site_accumulator(dim, device), site_accumulator(dim, device)) for _ in self.edges]
        return self._buckets[site]

    def state_bytes(self, indices: Sequence[int]) -> int:
        dims = [self.table.dims[i] for i in indices if self.table.dims[i] is not None]
        return len(self.edges) * covariance_state_bytes(dims)

    def update(self, site: int, stage: str, rows: Tensor, keep: Optional[Tensor], positions) -> None:
        """Add the rows (as the pre/post accumulators got them) to their buckets' accumulators."""
        at = positions()  # [N]
        if at is None:
            return
        edges = self._edges.get(at.device)
        if edges is None:
            edges = self._edges[at.device] = torch.tensor(self.edges, dtype=torch.long, device=at.device)
        bucket = torch.bucketize(at, edges, right=True) - 1  # [N]: -1 before the first edge
        for b, pair in enumerate(self.buckets(site)):
            accumulator = pair[0 if stage == "pre" else 1]
            if keep is not None:  # device path: masks, no host sync
                accumulator.update(rows, keep & (bucket == b))
            else:
                chosen = (bucket == b).nonzero().squeeze(1)
                if chosen.numel():
                    accumulator.update(rows.index_select(0, chosen))

    def reset(self) -> None:
        for pairs in self._buckets:
            for pair in pairs:
                for acc in pair:
                    acc.reset()

    def compute(self, report, context: ComputeContext) -> None:
        """One row per watched site and bucket in ``report.positions``."""
        keys = [(i, b) for i in context.watched for b in range(len(self.labels))]
        pairs = [self.buckets(i)[b] if self.buckets(i) else standin_pair() for i, b in keys]
        measured = context.reducer.measure_pairs(pairs, context.metrics, context.spectra_dtype, [i for i, _ in keys])
        for (i, b), row_values, bucket_spectra, count in zip(keys, *measured):
            label, start, end = self.labels[b]
            site = self.table.sites[i]
            if bucket_spectra is not None and self.buckets(i):
                report.position_eigenvalues[(site.site, label)] = bucket_spectra
            report.positions.append(
                {
                    "site": site.site,
                    "layer": site.layer,
                    "bucket": label,
                    "position_start": start,
                    "position_end": end,
                    "dim": int(self.table.dims[i] or 0),
                    "tokens": int(count),
                    **row_values,
                }
            )

    def accumulators(self, site: int) -> dict:
        return {"buckets": self.buckets(site)}

    def skipped_rows(self, site: int) -> dict[str, int]:
        """The buckets' skipped rows, per stage (the same rows the pre/post measurement skipped)."""
        pairs = self.buckets(site)
        return {"pre": sum(pre.skipped for pre, _ in pairs), "post": sum(post.skipped for _, post in pairs)}
