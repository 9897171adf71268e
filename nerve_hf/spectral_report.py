"""The result of one measurement window: one row of NerVE metrics per FFN site."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from .metrics import METRIC_NAMES

# Keys of every row, in column order.
ROW_KEYS = ("site", "layer", "dim", "tokens") + METRIC_NAMES

__all__ = ["METRIC_NAMES", "ROW_KEYS", "SpectralReport"]


@dataclass
class SpectralReport:
    """Per-site NerVE metrics.

    Attributes:
        rows: one dict per site with exactly :data:`ROW_KEYS`: ``site`` (str, ``"ffn.3"``), ``layer``,
            ``dim``, ``tokens`` (int) and the seven metrics (float, NaN when undefined).
        eigenvalues: site -> (pre, post) eigenvalues, descending float64 CPU tensors ``[dim]``.

    >>> ones, nans = {m: 1.0 for m in METRIC_NAMES}, {m: float("nan") for m in METRIC_NAMES}
    >>> r = SpectralReport(rows=[dict(site="ffn.0", layer=0, dim=3, tokens=9, **ones),
    ...                          dict(site="ffn.1", layer=1, dim=3, tokens=9, **nans)])
    >>> r.mean()["pr_pre"], r.to_log_dict()["nerve/ffn.0/js"], r.to_log_dict()["nerve/mean/js"]
    (1.0, 1.0, 1.0)
    """

    rows: list[dict] = field(default_factory=list)
    eigenvalues: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def mean(self) -> dict[str, float]:
        """Average of each metric over the sites that have it defined (NaN if none has)."""
        out = {}
        for name in METRIC_NAMES:
            values = [row[name] for row in self.rows if not math.isnan(row[name])]
            out[name] = math.fsum(values) / len(values) if values else float("nan")
        return out

    def to_log_dict(self, prefix: str = "nerve") -> dict[str, float]:
        """Flat ``{f"{prefix}/{site}/{metric}": value}`` for every row, plus ``f"{prefix}/mean/{metric}"``."""
        out = {f"{prefix}/{row['site']}/{name}": row[name] for row in self.rows for name in METRIC_NAMES}
        out.update({f"{prefix}/mean/{name}": value for name, value in self.mean().items()})
        return out

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` with columns :data:`ROW_KEYS` (then any extra summaries the
        rows carry, ``compute(extra_metrics=True)``)."""
        import pandas as pd  # imported on use: pandas is only needed here

        extra = [key for key in dict.fromkeys(k for row in self.rows for k in row) if key not in ROW_KEYS]
        return pd.DataFrame(self.rows, columns=list(ROW_KEYS) + extra)
