"""The memory budget of a tracker's float64 state, and the error for a state over budget.

The state one window needs is the sum of its measurements' ``state_bytes`` over the sites of its largest
round-robin group that this process measures; the budget holds for the largest window.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

__all__ = ["MemoryBudgetError", "covariance_state_bytes", "format_mib", "check_memory_budget"]

# Measurements the budget's message describes by formula; others are named.
_DESCRIBED = ("prepost", "stage_covariances", "flow", "positions", "cross_layer", "experts")


# What the message adds for routed experts (measurements.experts.Experts).
_EXPERTS_TERM = ", plus 2 x (F^2 + F) x 8 per measured routed expert of width F"
_EXPERTS_HINT = " or experts (experts=[...] a subset, experts_per_step=n a round-robin share per step)"


class MemoryBudgetError(ValueError):
    """The covariance state of the tracked FFNs would exceed ``memory_budget_mb``."""


def format_mib(n_bytes: float) -> str:
    """'1,003,555' for large sizes, three significant digits ('0.0429') for small ones."""
    mib = n_bytes / 2**20
    return f"{mib:,.0f}" if mib >= 100 else f"{mib:.3g}"


def covariance_state_bytes(dims: Iterable[int]) -> int:
    """Bytes of float64 covariance state for FFNs of these widths: 2 × (D² + D) × 8 each (pre and post).

    >>> covariance_state_bytes([3072] * 12) / 2**20  # GPT-2 small, every FFN
    1728.5625
    """
    return sum(2 * (d * d + d) * 8 for d in dims)


def check_memory_budget(
    limit_mb: Optional[float], windows: Sequence, owns: Callable[[int], bool], dims: Sequence[Optional[int]]
) -> None:
    """MemoryBudgetError if one of ``windows`` (bound :class:`~nerve_hf.tracking.windows.Window` s) needs
    more state for its largest group of owned sites than ``limit_mb`` MiB; ``dims``: each site's D."""
    if limit_mb is None:
        return
    candidates = [(window.measurements, [i for i in group if owns(i)]) for window in windows for group in window.groups]
    measurements, largest = max(candidates, key=lambda pair: pair[0].state_bytes(pair[1]))
    needed = measurements.state_bytes(largest)
    if needed <= limit_mb * 2**20:
        return
    names = [m.name for m in measurements.measurements]
    if names == ["prepost"]:
        widths = sorted({dims[i] for i in largest if dims[i] is not None})
        known = len([i for i in largest if dims[i] is not None])
        raise MemoryBudgetError(
            f"FFNTracker: tracking {known} FFNs of width {widths[0] if len(widths) == 1 else widths} needs "
            f"{format_mib(needed)} MiB of float64 covariance state (2 x (D^2 + D) x 8 bytes per FFN), over "
            f"memory_budget_mb={limit_mb:,g}. Track fewer FFNs (layers=[...]; NerveCallback's "
            f"layers_per_step measures a few per step) or raise the budget."
        )
    terms = {key: value for m in measurements.measurements for key, value in m.budget_terms.items()}
    others = [name for name in names if name not in _DESCRIBED]
    raise MemoryBudgetError(
        f"FFNTracker: tracking {len(dims)} FFNs needs {format_mib(needed)} MiB of float64 state "
        f"([(1 + B) x 2 x (D^2 + D) + s x (d^2 + d)] x 8 bytes per FFN with "
        f"B={terms.get('B', 0)} position buckets and s={terms.get('s', 0)} flow stages, "
        f"plus (d^2 + 2d) x 8 per layer pair{', plus the state of ' + ', '.join(others) if others else ''}"
        f"{_EXPERTS_TERM if 'experts' in names else ''}), over "
        f"memory_budget_mb={limit_mb:,g}. Track fewer FFNs or buckets{_EXPERTS_HINT if 'experts' in names else ''}, "
        f"or raise the budget."
    )
