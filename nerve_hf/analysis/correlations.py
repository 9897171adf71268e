"""Pearson correlations of a run's NerVE metrics with its loss of the same step, per split and site."""

from __future__ import annotations

import math
import warnings

from nerve_hf.analysis.runs import RunData, aligned, split_order
from nerve_hf.errors import requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sites import is_mean

__all__ = ["MIN_POINTS", "CORRELATION_COLUMNS", "correlations"]

MIN_POINTS = 3  # a Pearson correlation needs at least this many (metric, loss) pairs
CORRELATION_COLUMNS = ["split", "site", "metric", "r", "p", "n"]


def correlations(table, min_points: int = MIN_POINTS):
    """Pearson r (and its two-sided p) of each metric with the loss, per split and site.

    ``table``: :func:`aligned` rows (or a :class:`RunData`). Pairs where the metric or the loss is NaN
    are left out; ``n`` counts the pairs used. With fewer than ``min_points`` pairs, or a constant
    series, r and p are NaN. Rows: splits (train, eval, ...), sites (``mean`` first where the split has a
    layer mean, then by layer), metrics in :data:`nerve_hf.metrics.METRIC_NAMES` order.
    """
    import numpy as np

    with requires("analysis"):
        import pandas as pd
    from scipy import stats

    if isinstance(table, RunData):
        table = aligned(table)
    out = []
    for split in split_order(table["split"]):
        part = table[table["split"] == split]
        sites = part[["site", "layer"]].drop_duplicates("site")
        ordered = list(sites.sort_values("layer", kind="stable")["site"])
        sites = [s for s in ordered if is_mean(s)] + [s for s in ordered if not is_mean(s)]  # means first
        for site in sites:
            rows = part[part["site"] == site].sort_values("step")
            for name in METRIC_NAMES:
                x, y = rows[name].to_numpy(float), rows["loss"].to_numpy(float)
                keep = np.isfinite(x) & np.isfinite(y)
                x, y = x[keep], y[keep]
                r = p = math.nan
                if len(x) >= min_points and np.ptp(x) > 0 and np.ptp(y) > 0:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # near-constant input: scipy warns, we report its value
                        result = stats.pearsonr(x, y)
                    r, p = float(result.statistic), float(result.pvalue)
                out.append({"split": split, "site": site, "metric": name, "r": r, "p": p, "n": int(len(x))})
    return pd.DataFrame(out, columns=CORRELATION_COLUMNS)
