"""What one probe produced: :class:`ProbeResult` (metrics, spectra, provenance) and its ``report.json`` form.

>>> from nerve_hf.report import SpectralReport
>>> content = ProbeResult(report=SpectralReport(rows=[]), model={"name": "m"}).to_json()
>>> content["model"], sorted(content["environment"])[:2], "loss" in content
({'name': 'm'}, ['nerve_hf', 'python'], False)
"""

from __future__ import annotations

import datetime as _datetime
import platform
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from nerve_hf.report import SpectralReport

__all__ = ["ProbeResult", "environment"]


@dataclass
class ProbeResult:
    """One probe: the metrics, the spectra and where everything came from."""

    report: SpectralReport
    model: dict = field(default_factory=dict)  # provenance of the model
    data: dict = field(default_factory=dict)  # provenance of the inputs
    settings: dict = field(default_factory=dict)  # the options that shaped the measurement
    loss: Optional[float] = None  # mean token loss on the same tokens (``eval_loss``), else None

    def to_json(self) -> dict:
        """The content of ``report.json``."""
        from nerve_hf.metrics import METRIC_NAMES

        content = {
            "rows": self.report.rows,
            "mean": self.report.mean_summary(),
            "model": self.model,
            "data": self.data,
            "settings": self.settings,
            "environment": environment(),
            "created": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
            "metrics": {
                "definition": "NerVE (Jha & Reagen, ICLR 2026): eigenvalues of the covariance of FFN "
                "pre-activations (up/gate projection output) and post-activations (down "
                "projection input); SE natural-log entropy, PR participation ratio, EEE early "
                "eigenvalue enrichment, JS Jensen-Shannon divergence of pre vs post spectra",
                "names": list(METRIC_NAMES),
            },
        }
        if self.report.positions:
            content["positions"] = self.report.positions
        if self.report.cross_layer:
            content["cross_layer"] = self.report.cross_layer
        if self.report.routing:  # MoE models: per layer of routed experts, its routing statistics
            content["routing"] = self.report.routing
        if self.loss is not None:
            content["loss"] = self.loss
        return content


def environment() -> dict:
    """Versions of nerve_hf, Python, torch and (when loaded) transformers and timm."""
    import torch

    from nerve_hf import __version__

    versions = {"nerve_hf": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "timm"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", None)
    return versions
