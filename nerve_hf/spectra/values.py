"""Which metric set a measurement asks for, and the one entry point that computes it: exact or estimated."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from nerve_hf.extra_metrics import EXTRA_METRIC_NAMES, extra_metrics
from nerve_hf.spectra import estimate
from nerve_hf.spectra.exact import METRIC_SETS, SPECTRA_METHODS, HasCovariance, exact_metric_values

__all__ = ["metric_set", "metric_values", "extra_values"]


def metric_set(metrics: str, spectra: str) -> str:
    """The metric set of :func:`metric_values` for ``metrics`` (``"all"``/``"pr"``) computed with ``spectra``
    (``"exact"`` or ``"estimate"``); PR alone is exact either way.

    >>> metric_set("all", "estimate"), metric_set("pr", "estimate"), metric_set("all", "exact")
    ('estimate', 'pr', 'all')
    """
    if spectra not in SPECTRA_METHODS:
        raise ValueError(f"spectra must be one of {SPECTRA_METHODS}, got {spectra!r}")
    return "estimate" if spectra == "estimate" and metrics == "all" else metrics


def metric_values(
    pairs: Sequence[tuple[HasCovariance, HasCovariance]], metrics: str = "all", spectra_dtype: str = "float64"
) -> tuple[list[dict[str, float]], list[Optional[tuple[Tensor, Tensor]]]]:
    """The metrics of each (pre, post) pair of accumulators, and their spectra.

    ``metrics="all"``: every covariance eigendecomposed (:func:`spectra_of`, in ``spectra_dtype``), one
    batched :func:`nerve_hf.metrics.spectrum_metrics` call per width; spectra are descending float64 CPU
    tensors. ``metrics="pr"``: ``pr_pre``/``pr_post`` by the trace identity, every other metric NaN,
    no spectra (``None``). ``metrics="estimate"``: as ``"all"``, but pairs at least
    :data:`nerve_hf.spectra.estimate.ESTIMATE_MIN_DIM` wide are estimated by
    :func:`nerve_hf.spectra.estimate.estimated_metric_values` (their spectra: the exact top-k and a
    modelled bulk).
    """
    if metrics not in METRIC_SETS:
        raise ValueError(f"metrics must be one of {METRIC_SETS}, got {metrics!r}")
    if metrics == "estimate":
        return estimate.estimated_metric_values(pairs, min_dim=estimate.ESTIMATE_MIN_DIM, spectra_dtype=spectra_dtype)
    return exact_metric_values(pairs, metrics, spectra_dtype)


def extra_values(spectra: Sequence[Optional[tuple[Tensor, Tensor]]], counts: Sequence[int]) -> list[dict[str, float]]:
    """:data:`nerve_hf.extra_metrics.EXTRA_METRIC_NAMES` of each (pre, post) spectrum pair and its row count
    (all NaN for a pair without spectra, e.g. ``metrics="pr"``)."""
    out = []
    for pair, count in zip(spectra, counts):
        if pair is None:
            out.append(dict.fromkeys(EXTRA_METRIC_NAMES, float("nan")))
            continue
        values = extra_metrics(pair[0], pair[1], count, count)
        out.append({name: float(value) for name, value in values.items()})
    return out
