"""Position buckets (``position_buckets=[0, 16, 64, ...]``): metrics per bucket of token positions.

Rows of metrics per bucket of token positions [e_i, e_{i+1}) (the last bucket is open), from one
(pre, post) accumulator pair per bucket.
"""

from __future__ import annotations

from typing import Optional, Sequence

from nerve_hf.metrics import METRIC_NAMES

__all__ = ["POSITION_KEYS", "check_buckets", "position_bucket_list", "bucket_labels"]

# Keys of each row of SpectralReport.positions, in column order.
POSITION_KEYS = ("site", "layer", "bucket", "position_start", "position_end", "dim", "tokens") + METRIC_NAMES


def check_buckets(edges) -> Optional[tuple[int, ...]]:
    """``position_buckets`` as a tuple of strictly increasing non-negative integers (None stays None)."""
    if edges is None:
        return None
    if isinstance(edges, (str, bytes)) or not hasattr(edges, "__iter__"):
        raise TypeError(f"position_buckets must be a list of integers such as [0, 16, 64], got {edges!r}")
    edges = list(edges)
    if not edges or not all(isinstance(e, int) and not isinstance(e, bool) for e in edges):
        raise TypeError(f"position_buckets must be a non-empty list of integers such as [0, 16, 64], got {edges!r}")
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
