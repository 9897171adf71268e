"""Within-run series and correlations: NerVE metrics at each evaluation vs the eval loss at that step."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterable

import numpy as np

from nerve_hf.metrics import METRIC_NAMES

METRICS = METRIC_NAMES


def pearson(x: Iterable[float], y: Iterable[float]) -> dict:
    """``{"r", "p", "n"}`` of scipy's Pearson r on the finite pairs; r is None below 3 pairs or for a constant
    series."""
    from scipy.stats import pearsonr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    n = len(pairs)
    if n < 3:
        return {"r": None, "p": None, "n": n}
    xs, ys = np.array(pairs, dtype=np.float64).T  # [n], [n]
    if np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return {"r": None, "p": None, "n": n}
    result = pearsonr(xs, ys)
    return {"r": float(result.statistic), "p": float(result.pvalue), "n": n}


def family(site: str) -> str:
    """``"ffn.3"`` -> ``"ffn"``; ``"token_mlp.0"`` -> ``"token_mlp"``."""
    return site.rsplit(".", 1)[0]


def nerve_series(records: Iterable[dict], split: str = "eval") -> dict:
    """Per-site metric series from ``nerve_metrics.jsonl`` records of one split.

    Returns ``{"steps": [S], "sites": [K], "layers": [K], "dims": [K], "tokens": [S],
    "per_site": {metric: [[K] per step]}, "mean": {group: {metric: [S]}}}`` where the groups are ``"all"``
    (mean over every site, nerve_hf's ``nerve/mean``) and, for models with several site families (the
    Mixer's token_mlp and channel_mlp), one per family.
    """
    by_step: dict[int, dict[str, dict]] = defaultdict(dict)
    for record in records:
        if record.get("split") == split:
            by_step[int(record["step"])][record["site"]] = record
    steps = sorted(by_step)
    sites = sorted(
        {site for rows in by_step.values() for site in rows}, key=lambda s: (family(s), int(s.rsplit(".", 1)[1]))
    )
    first = {site: next(by_step[step][site] for step in steps if site in by_step[step]) for site in sites}
    per_site = {
        metric: [[_value(by_step[step].get(site, {}).get(metric)) for site in sites] for step in steps]
        for metric in METRICS
    }
    groups = {"all": sites}
    families = sorted({family(site) for site in sites})
    if len(families) > 1:
        groups.update({fam: [s for s in sites if family(s) == fam] for fam in families})
    mean = {
        group: {
            metric: [_nanmean(row[sites.index(s)] for s in members) for row in per_site[metric]] for metric in METRICS
        }
        for group, members in groups.items()
    }
    return {
        "steps": steps,
        "sites": sites,
        "layers": [int(first[site]["layer"]) for site in sites],
        "dims": [int(first[site]["dim"]) for site in sites],
        "tokens": [max(int(row.get("tokens", 0)) for row in by_step[step].values()) for step in steps],
        "per_site": per_site,
        "mean": mean,
    }


def correlations(series: dict, loss_by_step: dict[int, float]) -> dict:
    """Pearson r of each metric with the eval loss at the same steps: per mean group and per site.

    ``late`` repeats the layer-mean r on the second half of training (evaluations at steps >= half the
    last step), past the early transient in which short runs spend a large share of their evaluations.
    """
    steps = series["steps"]
    loss = [loss_by_step.get(step) for step in steps]
    out = {"mean": {}, "per_site": {}}
    for group, metrics in series["mean"].items():
        out["mean"][group] = {metric: pearson(values, loss) for metric, values in metrics.items()}
    for metric in METRICS:
        rows = series["per_site"][metric]  # [S][K]
        out["per_site"][metric] = [pearson([row[k] for row in rows], loss)["r"] for k in range(len(series["sites"]))]
    from_step = math.ceil(steps[-1] / 2) if steps else 0
    keep = [i for i, step in enumerate(steps) if step >= from_step]
    out["late"] = {
        "from_step": from_step,
        "mean": {
            metric: pearson([values[i] for i in keep], [loss[i] for i in keep])
            for metric, values in series["mean"]["all"].items()
        },
    }
    return out


def _value(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _nanmean(values: Iterable) -> float | None:
    finite = [v for v in values if v is not None]
    return math.fsum(finite) / len(finite) if finite else None


def collapse_end(se_pre: list) -> int | None:
    """Index of the evaluation that ends the early spectral collapse: the one with the lowest layer-mean
    SE_pre (the first such, over finite values), or None without finite values.

    Short runs first lose pre-activation entropy while the loss falls (the collapse) and then regain it
    while the loss keeps falling (the paper's regime); the minimum separates the two without a choice
    by eye, and it is the boundary whatever the run's length.
    """
    finite = [(value, i) for i, value in enumerate(se_pre) if value is not None and math.isfinite(value)]
    return min(finite)[1] if finite else None


def after_collapse(entry: dict) -> dict:
    """Layer-mean Pearson r of SE_pre and PR_pre with eval loss over the evaluations from
    :func:`collapse_end` on: ``{"from_step", "se_pre": pearson(...), "pr_pre": pearson(...)}``, from a
    result file's stored series (``nerve`` and ``history``), so it applies to files written before it."""
    steps, means = entry["nerve"]["steps"], entry["nerve"]["mean"]["all"]
    loss_by_step = dict(zip(entry["history"]["step"], entry["history"]["eval_loss"]))
    end = collapse_end(means["se_pre"])
    if end is None:
        return {"from_step": None, "se_pre": pearson([], []), "pr_pre": pearson([], [])}
    loss = [loss_by_step.get(step) for step in steps[end:]]
    return {
        "from_step": steps[end],
        **{metric: pearson(means[metric][end:], loss) for metric in ("se_pre", "pr_pre")},
    }


def even_spacing(entry: dict) -> dict:
    """Layer-mean Pearson r of SE_pre and PR_pre with eval loss over the evaluations at multiples of the
    run's ``eval_every`` (and its last step): evenly spaced checkpoints, as a long run saves them, without
    the extra evaluations of a dense opening phase (``eval_dense_every``). Runs without a dense phase get
    the same r as over all evaluations. ``{"every", "se_pre": pearson(...), "pr_pre": pearson(...)}``."""
    steps, means = entry["nerve"]["steps"], entry["nerve"]["mean"]["all"]
    loss_by_step = dict(zip(entry["history"]["step"], entry["history"]["eval_loss"]))
    every = entry["settings"]["eval_every"]
    keep = [i for i, step in enumerate(steps) if step % every == 0 or step == steps[-1]]
    loss = [loss_by_step.get(steps[i]) for i in keep]
    return {
        "every": every,
        **{metric: pearson([means[metric][i] for i in keep], loss) for metric in ("se_pre", "pr_pre")},
    }
