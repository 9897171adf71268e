"""Streaming cross-covariance of two aligned streams of rows, and linear CKA from it.

:class:`CrossCovarianceAccumulator` keeps, for rows x ``[N, d_x]`` and y ``[N, d_y]`` that belong to the
same tokens (the FFN inputs of two layers of one forward), the count n, the means μ_x, μ_y and the
float64 cross-scatter C = Σ (x − μ_x)(y − μ_y)ᵀ ``[d_x, d_y]``. Batches merge exactly with the
parallel update of Chan, Golub & LeVeque (1979), written for two streams::

    n = n_a + n_b,  δ_x = μ_x,b − μ_x,a,  δ_y = μ_y,b − μ_y,a,  C = C_a + C_b + δ_x δ_yᵀ n_a n_b / n

Each batch is centred on its own mean rounded to the working precision (fp32, or fp64 when both
streams are fp64), multiplied with TF32 kept out, and the rounding remainder r is removed in float64
(Σ(x − s_x)(y − s_y)ᵀ = C_b + n r_x r_yᵀ), as :mod:`nerve_hf.stats.covariance` does for one stream.
:meth:`CrossCovarianceAccumulator.sync` sums the statistics of every process exactly (two packed
all-reduces, through :mod:`nerve_hf.parallel.comm`).

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

from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from nerve_hf.parallel.comm import all_reduce_sum, is_distributed
from nerve_hf.stats.covariance import checked_integers, checked_tensors
from nerve_hf.stats.kernels import exact_fp32_matmul

__all__ = ["CrossCovarianceAccumulator", "sync_cross_accumulators", "linear_cka"]


class CrossCovarianceAccumulator:
    """Running means and cross-covariance of aligned row streams x ``[N, dim_x]`` and y ``[N, dim_y]``.

    Args:
        dim_x, dim_y: widths of the two streams.
        device: where the float64 state lives; ``None`` takes the device of the first batch.

    A row pair where either row holds NaN or Inf is skipped and counted in :attr:`skipped`.
    """

    def __init__(self, dim_x: int, dim_y: int, device: Optional[torch.device | str] = None) -> None:
        if int(dim_x) < 1 or int(dim_y) < 1:
            raise ValueError(f"widths must be positive integers, got {dim_x} and {dim_y}")
        self.dim_x, self.dim_y = int(dim_x), int(dim_y)
        self._device = torch.device(device) if device is not None else None
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every row pair seen so far (keeps the widths and device)."""
        self._n = 0
        self._skipped = 0
        self._mean_x: Optional[Tensor] = None  # [d_x] float64
        self._mean_y: Optional[Tensor] = None  # [d_y] float64
        self._cross: Optional[Tensor] = None  # [d_x, d_y] float64: Σ (x − μ_x)(y − μ_y)ᵀ
        self._global: Optional[tuple[int, int, Tensor, Tensor, Tensor]] = None  # after sync()

    def _allocate(self, device: torch.device) -> None:
        if self._device is None:
            self._device = device
        self._mean_x = torch.zeros(self.dim_x, dtype=torch.float64, device=self._device)
        self._mean_y = torch.zeros(self.dim_y, dtype=torch.float64, device=self._device)
        self._cross = torch.zeros(self.dim_x, self.dim_y, dtype=torch.float64, device=self._device)

    @property
    def device(self) -> Optional[torch.device]:
        return self._device

    def _state(self):
        """(count, skipped, mean_x, mean_y, cross): the synced totals after :meth:`sync`, else this process's."""
        if self._global is not None:
            return self._global
        return self._n, self._skipped, self._mean_x, self._mean_y, self._cross

    @property
    def count(self) -> int:
        """Row pairs in the statistics (all processes after :meth:`sync`)."""
        return self._state()[0]

    @property
    def skipped(self) -> int:
        """Row pairs dropped because either row held NaN or Inf."""
        return self._state()[1]

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
        self._merge(n, mean_x, mean_y, scatter)

    def _merge(self, n_b: int, mean_x: Tensor, mean_y: Tensor, cross: Tensor) -> None:
        """Chan et al.'s update of (n, μ_x, μ_y, C) with a batch's (n_b, μ_x,b, μ_y,b, C_b)."""
        self._global = None
        if self._mean_x is None:
            self._allocate(mean_x.device)
        mean_x, mean_y, cross = mean_x.to(self._device), mean_y.to(self._device), cross.to(self._device)
        n_a = self._n
        n = n_a + n_b
        delta_x, delta_y = mean_x - self._mean_x, mean_y - self._mean_y
        self._cross.add_(cross).add_(torch.outer(delta_x, delta_y), alpha=n_a * n_b / n)
        self._mean_x.add_(delta_x, alpha=n_b / n)
        self._mean_y.add_(delta_y, alpha=n_b / n)
        self._n = n

    def merge(self, other: "CrossCovarianceAccumulator") -> "CrossCovarianceAccumulator":
        """Fold another accumulator's row pairs into this one (as if they had been updated here)."""
        if (other.dim_x, other.dim_y) != (self.dim_x, self.dim_y):
            raise ValueError(
                f"cannot merge cross-covariances of widths ({self.dim_x}, {self.dim_y}) and "
                f"({other.dim_x}, {other.dim_y})"
            )
        self._skipped += other._skipped
        if other._n > 0:
            self._merge(other._n, other._mean_x, other._mean_y, other._cross)
        return self

    def sync(self, group=None) -> None:
        """Sum the statistics of all processes of ``group`` exactly; a no-op on one process."""
        sync_cross_accumulators([self], group)

    # --------------------------------------------------------------- results
    def mean(self) -> tuple[Tensor, Tensor]:
        """(μ_x ``[dim_x]``, μ_y ``[dim_y]``), float64 (NaN before any row)."""
        n, _, mean_x, mean_y, _ = self._state()
        if n == 0:
            nan = float("nan")
            return (
                torch.full((self.dim_x,), nan, dtype=torch.float64, device=self._device),
                torch.full((self.dim_y,), nan, dtype=torch.float64, device=self._device),
            )
        return mean_x.clone(), mean_y.clone()

    def scatter(self) -> Tensor:
        """Σ (x − μ_x)(y − μ_y)ᵀ, float64 ``[dim_x, dim_y]`` (zeros before any row)."""
        n, _, _, _, cross = self._state()
        if n == 0:
            return torch.zeros(self.dim_x, self.dim_y, dtype=torch.float64, device=self._device)
        return cross.clone()

    def cross_covariance(self) -> Tensor:
        """Unbiased Σ_xy = scatter / (n − 1), float64 ``[dim_x, dim_y]`` (NaN with fewer than 2 rows)."""
        n = self.count
        if n < 2:
            return torch.full((self.dim_x, self.dim_y), float("nan"), dtype=torch.float64, device=self._device)
        return self.scatter() / (n - 1)

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """This process's own statistics (never the synced totals), as CPU tensors."""
        zeros = torch.zeros
        return {
            "dim_x": self.dim_x,
            "dim_y": self.dim_y,
            "count": self._n,
            "skipped": self._skipped,
            "mean_x": (self._mean_x if self._n else zeros(self.dim_x, dtype=torch.float64)).detach().cpu().clone(),
            "mean_y": (self._mean_y if self._n else zeros(self.dim_y, dtype=torch.float64)).detach().cpu().clone(),
            "cross": (self._cross if self._n else zeros(self.dim_x, self.dim_y, dtype=torch.float64))
            .detach()
            .cpu()
            .clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; an invalid ``state`` raises ``ValueError``, changing nothing."""
        where = "CrossCovarianceAccumulator.load_state_dict:"
        shapes = {"mean_x": (self.dim_x,), "mean_y": (self.dim_y,), "cross": (self.dim_x, self.dim_y)}
        integers = checked_integers(state, where, ("dim_x", "dim_y", "count", "skipped"), shapes)
        if (integers["dim_x"], integers["dim_y"]) != (self.dim_x, self.dim_y):
            raise ValueError(
                f"{where} the state is for widths ({integers['dim_x']}, {integers['dim_y']}), but this "
                f"accumulator has ({self.dim_x}, {self.dim_y})."
            )
        checked_tensors(state, where, shapes, integers["count"])
        self.reset()
        self._skipped = integers["skipped"]
        if integers["count"] > 0:
            self._allocate(self._device or torch.device("cpu"))
            self._n = integers["count"]
            self._mean_x.copy_(state["mean_x"])
            self._mean_y.copy_(state["mean_y"])
            self._cross.copy_(state["cross"])

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
    """
    if not is_distributed(group) or not accumulators:
        return
    devices = {acc.device for acc in accumulators if acc.device is not None}
    if len(devices) > 1:
        raise ValueError(f"accumulators synced together must share one device, got {sorted(map(str, devices))}")
    if devices:
        device = devices.pop()
    else:
        backend = torch.distributed.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

    def local(acc, attr, size):
        value = getattr(acc, attr)
        return value.to(device) if value is not None else torch.zeros(size, dtype=torch.float64, device=device)

    first = torch.cat(
        [
            torch.cat(
                [
                    torch.tensor([acc._n, acc._skipped], dtype=torch.float64, device=device),
                    local(acc, "_mean_x", acc.dim_x) * acc._n,
                    local(acc, "_mean_y", acc.dim_y) * acc._n,
                ]
            )
            for acc in accumulators
        ]
    )
    all_reduce_sum(first, group)
    totals, offset = [], 0
    for acc in accumulators:
        n, skipped = int(first[offset]), int(first[offset + 1])
        mean_x = first[offset + 2 : offset + 2 + acc.dim_x] / max(n, 1)
        mean_y = first[offset + 2 + acc.dim_x : offset + 2 + acc.dim_x + acc.dim_y] / max(n, 1)
        totals.append((n, skipped, mean_x, mean_y))
        offset += 2 + acc.dim_x + acc.dim_y
    parts = []
    for acc, (_, _, mean_x, mean_y) in zip(accumulators, totals):
        if acc._n == 0:
            parts.append(torch.zeros(acc.dim_x * acc.dim_y, dtype=torch.float64, device=device))
            continue
        # this process's scatter about the global means: C_i + n_i (μ_x,i − μ_x)(μ_y,i − μ_y)ᵀ
        about = torch.addr(
            acc._cross.to(device), acc._mean_x.to(device) - mean_x, acc._mean_y.to(device) - mean_y, alpha=acc._n
        )
        parts.append(about.reshape(-1))
    second = torch.cat(parts)
    all_reduce_sum(second, group)
    offset = 0
    for acc, (n, skipped, mean_x, mean_y) in zip(accumulators, totals):
        size = acc.dim_x * acc.dim_y
        cross = second[offset : offset + size].view(acc.dim_x, acc.dim_y)
        offset += size
        target = acc._device or device
        acc._global = (n, skipped, mean_x.to(target), mean_y.to(target), cross.to(target))


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
