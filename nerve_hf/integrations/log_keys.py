"""Which of a report's keys NerveCallback hands to the Trainer's logs, and how it tells evaluation records.

>>> from nerve_hf.integrations.config import NerveConfig
>>> from nerve_hf.metrics import METRIC_NAMES
>>> from nerve_hf.report import SpectralReport
>>> report = SpectralReport(rows=[dict(site="ffn.0", layer=0, dim=3, tokens=9, **dict.fromkeys(METRIC_NAMES, 1.0))])
>>> sorted(log_dict(report, NerveConfig(metrics="pr", log_per_site=False), prefix="eval_"))
['eval_nerve/mean/pr_post', 'eval_nerve/mean/pr_pre']
>>> eval_prefix({"eval_loss": 2.0, "eval_runtime": 0.1}), eval_prefix({"loss": 2.0})
('eval_', None)
"""

from __future__ import annotations

from typing import Optional

from nerve_hf.integrations.config import NerveConfig
from nerve_hf.report import SpectralReport

__all__ = ["eval_prefix", "log_dict"]


def eval_prefix(logs: dict) -> Optional[str]:
    """``"eval_"`` (or ``"eval_<name>_"``, ``"test_"``) when ``logs`` is an evaluation record (the Trainer
    puts ``<prefix>runtime`` in every evaluation's metrics), else None."""
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("runtime")]
    return None


def log_dict(report: SpectralReport, config: NerveConfig, prefix: str = "") -> dict:
    """The report's ``<prefix>nerve/...`` keys that ``config`` logs: per-site keys only with
    ``log_per_site``; no layer means with ``layers_per_step`` (a mean over one group of blocks would change
    meaning from step to step); with ``metrics="pr"`` only what the trace identity gives (and CKA, which
    needs no spectrum)."""
    logs = report.to_log_dict(prefix=f"{prefix}nerve")
    mean = f"{prefix}nerve/mean/"
    if not config.log_per_site:
        logs = {k: v for k, v in logs.items() if k.startswith(mean)}
    if config.layers_per_step is not None:
        logs = {k: v for k, v in logs.items() if not k.startswith(mean)}
    if config.metrics == "pr":
        logs = {k: v for k, v in logs.items() if k.rpartition("/")[2].startswith(("pr_", "cka_"))}
    return logs
