"""Memory of the float64 covariance state, and the error for a state over budget."""

from __future__ import annotations

from typing import Iterable

__all__ = ["MemoryBudgetError", "covariance_state_bytes", "format_mib"]


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
