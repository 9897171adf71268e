"""Streaming cross-covariance of two aligned streams of rows, and linear CKA from it.

:class:`CrossCovarianceAccumulator` keeps, for rows x ``[N, d_x]`` and y ``[N, d_y]`` that belong to the
same tokens (the FFN inputs of two layers of one forward), the count n, the means μ_x, μ_y and the
float64 cross-scatter C = Σ (x − μ_x)(y − μ_y)ᵀ ``[d_x, d_y]``. Batches merge exactly with the
parallel update of Chan, Golub & LeVeque (1979), written for two streams::

    n = n_a + n_b,  δ_x = μ_x,b − μ_x,a,  δ_y = μ_y,b − μ_y,a,  C = C_a + C_b + δ_x δ_yᵀ n_a n_b / n

Each batch is centred on its own mean rounded to the working precision (fp32, or fp64 when both
streams are fp64), multiplied with TF32 kept out, and the rounding remainder r is removed in float64
(Σ(x − s_x)(y − s_y)ᵀ = C_b + n r_x r_yᵀ), as :mod:`nerve_hf.stats.covariance` does for one stream.
The merge, persistence and exact sync (two packed all-reduces, through :mod:`nerve_hf.parallel.comm`)
are the base class's, :class:`~nerve_hf.stats.moments.StreamingMoments`; C is its second moment.

Linear CKA (Kornblith et al., 2019) of the two streams, with centred covariances:
``CKA = ‖Σ_xy‖_F² / (‖Σ_xx‖_F ‖Σ_yy‖_F)`` in [0, 1]; the factors 1/(n − 1) cancel, so it is computed from
the scatters. Memory: ``(d_x·d_y + d_x + d_y) × 8`` bytes per pair; an update costs one
``N × d_x × d_y`` product.

>>> import torch
>>> x = torch.randn(50, 3, dtype=torch.float64)
>>> acc = CrossCovarianceAccumulator(3, 3)
>>> acc.update(x[:20], 2 * x[:20]); acc.update(x[20:], 2 * x[20:])
>>> bool(torch.allclose(acc.cross_covariance(), 2 * torch.cov(x.T)))
True
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from nerve_hf.stats.kernels import exact_fp32_matmul
from nerve_hf.stats.moments import MomentsLayout, StreamingMoments, sync_moments

__all__ = ["CrossCovarianceAccumulator", "sync_cross_accumulators", "linear_cka"]


class CrossCovarianceAccumulator(StreamingMoments):
    """Running means and cross-covariance of aligned row streams x ``[N, dim_x]`` and y ``[N, dim_y]``.

    Args:
        dim_x, dim_y: widths of the two streams.
        device: where the float64 state lives; ``None`` takes the device of the first batch.

    A row pair where either row holds NaN or Inf is skipped and counted in :attr:`skipped`.
    """

    # C = Σ (x − μ_x)(y − μ_y)ᵀ [d_x, d_y]: rows from the first mean, columns from the second
    LAYOUT = MomentsLayout(widths=("dim_x", "dim_y"), means=("mean_x", "mean_y"), moment="cross", moment_of=(0, 1))

    def __init__(self, dim_x: int, dim_y: int, device: Optional[torch.device | str] = None) -> None:
        if int(dim_x) < 1 or int(dim_y) < 1:
            raise ValueError(f"widths must be positive integers, got {dim_x} and {dim_y}")
        self.dim_x, self.dim_y = int(dim_x), int(dim_y)
        super().__init__((self.dim_x, self.dim_y), device)

    @property
    def count(self) -> int:
        """Row pairs in the statistics (all processes after :meth:`sync`)."""
        return self.moments().count

    @property
    def skipped(self) -> int:
        """Row pairs dropped because either row held NaN or Inf."""
        return self.moments().skipped

    # ---------------------------------------------------------------- update
    def update(self, x: Tensor, y: Tensor) -> None:
        """Add the row pairs of ``x`` ``[..., dim_x]`` and ``y`` ``[..., dim_y]`` (the same leading shape)."""
        x, y = torch.as_tensor(x).detach(), torch.as_tensor(y).detach()
        if x.ndim == 0 or y.ndim == 0 or x.shape[-1] != self.dim_x or y.shape[-1] != self.dim_y:
            raise ValueError(
                f"CrossCovarianceAccumulator({self.dim_x}, {self.dim_y}) expects rows of widths "
                f"({self.dim_x}, {self.dim_y}), got shapes {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[:-1] != y.shape[:-1]:
            raise ValueError(f"x and y must hold the same rows, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
        if not (x.is_floating_point() and y.is_floating_point()):
            raise TypeError(f"rows must be floating point, got {x.dtype} and {y.dtype}")
        x, y = x.reshape(-1, self.dim_x), y.reshape(-1, self.dim_y)  # [N, d_x], [N, d_y]
        if x.shape[0] == 0:
            return
        y = y.to(x.device)
        finite = torch.isfinite(x).all(dim=1) & torch.isfinite(y).all(dim=1)  # [N]
        if not bool(finite.all()):
            self._skipped += int((~finite).sum())
            x, y = x[finite], y[finite]
            if x.shape[0] == 0:
                return
        work = torch.float64 if x.dtype == torch.float64 and y.dtype == torch.float64 else torch.float32
        n = x.shape[0]
        moments = []
        for rows in (x, y):
            shift = rows.sum(dim=0, dtype=torch.float64).div_(n).to(work)  # [d]: batch mean, rounded
            centred = rows.to(work) - shift  # [N, d]
            moments.append((shift, centred, centred.sum(dim=0, dtype=torch.float64)))  # remainder sum [d]
        (shift_x, centred_x, rem_x), (shift_y, centred_y, rem_y) = moments
        with exact_fp32_matmul(x.device):
            scatter = (centred_x.T @ centred_y).to(torch.float64)  # [d_x, d_y] about the shifts
        scatter.sub_(torch.outer(rem_x, rem_y), alpha=1.0 / n)  # now about the exact batch means
        mean_x = shift_x.to(torch.float64) + rem_x / n
        mean_y = shift_y.to(torch.float64) + rem_y / n
        self._merge_moments(n, (mean_x, mean_y), scatter)

    def merge(self, other: "CrossCovarianceAccumulator") -> "CrossCovarianceAccumulator":
        """Fold another accumulator's row pairs into this one (as if they had been updated here)."""
        if (other.dim_x, other.dim_y) != (self.dim_x, self.dim_y):
            raise ValueError(
                f"cannot merge cross-covariances of widths ({self.dim_x}, {self.dim_y}) and "
                f"({other.dim_x}, {other.dim_y})"
            )
        return super().merge(other)

    # --------------------------------------------------------------- results
    def mean(self) -> tuple[Tensor, Tensor]:
        """(μ_x ``[dim_x]``, μ_y ``[dim_y]``), float64 (NaN before any row)."""
        n, _, (mean_x, mean_y), _ = self.moments()
        if n == 0:
            nan = float("nan")
            return (
                torch.full((self.dim_x,), nan, dtype=torch.float64, device=self._device),
                torch.full((self.dim_y,), nan, dtype=torch.float64, device=self._device),
            )
        return mean_x.clone(), mean_y.clone()

    def scatter(self) -> Tensor:
        """Σ (x − μ_x)(y − μ_y)ᵀ, float64 ``[dim_x, dim_y]`` (zeros before any row)."""
        n, _, _, cross = self.moments()
        if n == 0:
            return torch.zeros(self.dim_x, self.dim_y, dtype=torch.float64, device=self._device)
        return cross.clone()

    def cross_covariance(self) -> Tensor:
        """Unbiased Σ_xy = scatter / (n − 1), float64 ``[dim_x, dim_y]`` (NaN with fewer than 2 rows)."""
        n = self.count
        if n < 2:
            return torch.full((self.dim_x, self.dim_y), float("nan"), dtype=torch.float64, device=self._device)
        return self.scatter() / (n - 1)

    def _widths_mismatch(self, widths: tuple[int, ...]) -> str:
        return f"the state is for widths {widths}, but this accumulator has ({self.dim_x}, {self.dim_y})."

    def __repr__(self) -> str:
        return (
            f"CrossCovarianceAccumulator(dim_x={self.dim_x}, dim_y={self.dim_y}, count={self.count}, "
            f"device={self._device})"
        )


def sync_cross_accumulators(accumulators: Sequence[CrossCovarianceAccumulator], group=None) -> None:
    """Exact cross-process sync of many cross-covariances with two packed all-reduces over ``group``.

    With processes holding (n_i, μ_x,i, μ_y,i, C_i): n = Σ n_i, μ = Σ n_i μ_i / n and
    C = Σ [C_i + n_i (μ_x,i − μ_x)(μ_y,i − μ_y)ᵀ], pure sums. A no-op on one process; this process's
    own statistics stay as they were, so syncing again never counts a row twice.
    :func:`~nerve_hf.stats.moments.sync_moments` does it, for accumulators of any kind.
    """
    sync_moments(accumulators, group)


def linear_cka(cross: Tensor, scatter_x: Tensor, scatter_y: Tensor) -> float:
    """Linear CKA = ‖C_xy‖_F² / (‖C_xx‖_F ‖C_yy‖_F) of centred (co)variances or scatters (any common
    scale cancels): 1 when y is an orthogonal transform of x times a scalar, 0 when uncorrelated.
    NaN when either stream has no variance or a matrix is not finite.

    >>> x = torch.randn(40, 3, dtype=torch.float64); xc = x - x.mean(0)
    >>> round(linear_cka(xc.T @ (2 * xc), xc.T @ xc, 4 * xc.T @ xc), 12)
    1.0
    """
    cross, scatter_x, scatter_y = (m.to(torch.float64) for m in (cross, scatter_x, scatter_y))
    norm_x, norm_y = torch.linalg.matrix_norm(scatter_x), torch.linalg.matrix_norm(scatter_y.to(scatter_x.device))
    numerator = cross.to(scatter_x.device).square().sum()
    value = float(numerator / (norm_x * norm_y))
    if not (norm_x > 0 and norm_y > 0) or value != value or value in (float("inf"), float("-inf")):
        return float("nan")
    return value
