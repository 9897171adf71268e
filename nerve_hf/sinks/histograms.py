"""Each measured spectrum as a histogram of log10(λ / Σλ), to TensorBoard and to W&B.

Tags: ``<split>/nerve/<site>/log10_spectrum_<pre|post>``, at the measurement's step. Only the positive
eigenvalues of a finite spectrum are drawn (a share of 0 has no logarithm), so every value is at most 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

from nerve_hf.sinks.base import WarnOnce

if TYPE_CHECKING:
    from nerve_hf.report import SpectralReport

__all__ = ["spectrum_shares", "HistogramSink"]


def spectrum_shares(report: SpectralReport, split: str) -> dict[str, np.ndarray]:
    """``{tag: log10(λ / Σλ) of the positive λ}`` for every (site, pre|post) spectrum of ``report`` that has a
    positive value and no NaN or Inf; not for routed experts (rows of ``kind == "expert"``: a large MoE has
    thousands; the spectra archive keeps theirs).

    >>> from nerve_hf.report import SpectralReport
    >>> pre, post = torch.tensor([9.0, 1.0, 0.0], dtype=torch.float64), torch.full((3,), float("nan"))
    >>> spectrum_shares(SpectralReport(eigenvalues={"ffn.0": (pre, post)}), "eval")
    {'eval/nerve/ffn.0/log10_spectrum_pre': array([-0.04575749, -1.        ])}
    """
    shares = {}
    experts = {row["site"] for row in report.rows if row.get("kind") == "expert"}  # thousands in a large MoE
    for site, sides in report.eigenvalues.items():
        if site in experts:  # routed experts' spectra go to the archive only, like their rows to the records
            continue
        for side, values in zip(("pre", "post"), sides):
            values = values[values > 0]  # [k]: the positive eigenvalues
            if values.numel() and bool(torch.isfinite(values).all()):
                shares[f"{split}/nerve/{site}/log10_spectrum_{side}"] = torch.log10(values / values.sum()).numpy()
    return shares


class HistogramSink:
    """Draws every spectrum of a measurement as a histogram (:func:`spectrum_shares`).

    Args:
        tensorboard: returns the ``SummaryWriter`` to draw into at each write (or None: not now).
        wandb: returns the ``wandb`` module whose run logs the histograms (or None: not now); they are
            logged with ``commit=False`` beside ``train/global_step``, so they join the run's next record.

    Both are asked at every write, as a Trainer's writer and run may come and go between measurements.
    A failed write (``OSError``) warns once and the next measurement is tried again.

    >>> import tempfile
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> from nerve_hf.report import SpectralReport
    >>> writer = SummaryWriter(tempfile.mkdtemp())
    >>> sink = HistogramSink(tensorboard=lambda: writer)
    >>> sink.write(SpectralReport(eigenvalues={"ffn.0": (torch.tensor([3.0, 1.0]), torch.ones(2))}), "train", 4)
    >>> writer.close()
    """

    def __init__(
        self,
        tensorboard: Optional[Callable[[], Any]] = None,
        wandb: Optional[Callable[[], Any]] = None,
    ) -> None:
        self.tensorboard = tensorboard
        self.wandb = wandb
        self._warn = WarnOnce()

    def write(self, report: SpectralReport, split: str, step: int) -> None:
        shares = spectrum_shares(report, split)
        if not shares:
            return
        try:
            writer = self.tensorboard() if self.tensorboard is not None else None
            for tag, values in shares.items() if writer is not None else ():
                writer.add_histogram(tag, values, step)
            wandb = self.wandb() if self.wandb is not None else None
            if wandb is not None:
                histograms = {tag: wandb.Histogram(values) for tag, values in shares.items()}
                wandb.log({**histograms, "train/global_step": step}, commit=False)
        except OSError as error:
            self._warn(
                "histograms",
                f"NerveCallback: spectrum histograms are not being written ({type(error).__name__}: {error}); "
                f"the metrics still are. Later measurements are tried again.",
            )

    def drop_after(self, step: int) -> None:
        """Nothing to drop: what was sent to TensorBoard or W&B is not taken back."""
