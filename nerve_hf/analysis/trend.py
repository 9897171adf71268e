"""Correlations over training time without the shared trend: r of the first differences, and a few-points flag.

A metric and the loss that both drift with the step correlate strongly whatever links them (n = 5 points on two
monotone curves give |r| near 1). Beside the paper's plain Pearson r, :func:`trend_free_correlations` reports
Pearson r of the step-to-step changes (Δmetric against Δloss between consecutive aligned measurements), which
a shared monotone trend does not inflate, and flags r computed from fewer than :data:`FEW_POINTS` points.
"""

from __future__ import annotations

import math
import warnings

from nerve_hf.analysis.runs import split_order
from nerve_hf.errors import requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sites import is_mean

__all__ = ["FEW_POINTS", "TREND_COLUMNS", "trend_free_correlations"]

FEW_POINTS = 8  # Pearson r from fewer (metric, loss) pairs is flagged: its sampling error is too large to read
TREND_COLUMNS = ["split", "site", "metric", "r_diff", "p_diff", "n_diff", "few_points"]


def trend_free_correlations(table, min_points: int = 3):
    """Pearson r (scipy) of the first differences of each metric and the loss, per split and site.

    ``table``: :func:`nerve_hf.analysis.runs.aligned` rows (split, site, step, metrics, loss). The pairs with a
    finite metric and loss are sorted by step; ``n_diff`` counts their consecutive differences, and r_diff/p_diff
    are NaN below ``min_points`` of them or for a constant series. ``few_points``: fewer than
    :data:`FEW_POINTS` pairs behind the plain r of the same row.

    >>> import pandas as pd
    >>> steps = list(range(10))
    >>> table = pd.DataFrame({"split": "eval", "site": "mean", "layer": -1, "step": steps,
    ...     "loss": [5 - 0.3 * s + (0.1 if s % 2 else 0) for s in steps],
    ...     **{name: [float(s) + (0.2 if s % 3 == 0 else 0) for s in steps] for name in METRIC_NAMES}})
    >>> row = trend_free_correlations(table).iloc[0]  # both trend with the step: plain r is -0.99
    >>> (row.metric, bool(abs(row.r_diff) < 0.1), int(row.n_diff), bool(row.few_points))
    ('se_pre', True, 9, False)
    """
    import numpy as np

    with requires("analysis"):
        import pandas as pd
    from scipy import stats

    out = []
    for split in split_order(table["split"]):
        part = table[table["split"] == split]
        sites = part[["site", "layer"]].drop_duplicates("site")
        ordered = list(sites.sort_values("layer", kind="stable")["site"])
        sites = ["mean"] if "mean" not in ordered and not any(map(is_mean, ordered)) else []
        sites += [s for s in ordered if is_mean(s)] + [s for s in ordered if not is_mean(s)]  # means first
        for site in sites:
            rows = part[part["site"] == site].sort_values("step")
            for name in METRIC_NAMES:
                x, y = rows[name].to_numpy(float), rows["loss"].to_numpy(float)
                keep = np.isfinite(x) & np.isfinite(y)
                dx, dy = np.diff(x[keep]), np.diff(y[keep])  # [n - 1]: changes between consecutive pairs
                r = p = math.nan
                if len(dx) >= min_points and np.ptp(dx) > 0 and np.ptp(dy) > 0:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        result = stats.pearsonr(dx, dy)
                    r, p = float(result.statistic), float(result.pvalue)
                out.append(
                    {
                        "split": split,
                        "site": site,
                        "metric": name,
                        "r_diff": r,
                        "p_diff": p,
                        "n_diff": int(len(dx)),
                        "few_points": bool(keep.sum() < FEW_POINTS),
                    }
                )
    return pd.DataFrame(out, columns=TREND_COLUMNS)
