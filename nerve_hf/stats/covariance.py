"""Streaming covariance of activations with exact merging across batches and processes.

This module forms each batch's scatter; the running moments, their merge, persistence and exact
cross-process sync belong to the base class :class:`~nerve_hf.stats.moments.StreamingMoments`.
:mod:`nerve_hf.spectra` turns covariances into eigenvalues and metrics.

Each batch is centred on its own mean s (a column sum with at least fp32 accumulation, rounded to
the working precision) and its scatter matrix Σ(x − s)(x − s)ᵀ is formed in the working precision,
together with the remainder r = mean(x − s) that the rounding of s left; the float64 merge removes
n·rrᵀ, so the result is the scatter about the exact batch mean. The working precision is the rows'
own for fp32/fp64 and fp32 for fp16/bf16: x − s computed in bf16 keeps only 8 bits, while converted
to fp32 during the centring the values are exact and the fp32 product (TF32 kept out) is good to fp32
round-off. Rows are centred and multiplied in chunks: a few MB on the CPU (a cache-sized buffer rather
than a second copy of the batch, whose fresh pages cost as much as the centring itself, and no
float64 pass over the batch, since a casting reduction is much slower than an fp32 one there), up to
256 MB of fp32 on accelerators. On the CPU only the upper block triangle of the symmetric scatter is
multiplied and the rest is mirrored (:mod:`nerve_hf.stats.kernels`): about half the FLOPs of one
``xᵀx`` (benchmarks/perf/accumulator_throughput.py measures it against that GEMM). Batches merge into float64
running moments with the parallel update of Chan, Golub & LeVeque (1979)::

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δδᵀ n_a n_b / n

Raw Σxxᵀ is never accumulated: post-activation values have large means and Σxxᵀ − nμμᵀ cancels.
Memory is one float64 ``[D, D]`` matrix and one ``[D]`` vector per accumulator, whatever the number
of tokens.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from nerve_hf.spectra import eigenvalues_batched
from nerve_hf.stats.kernels import exact_fp32_matmul, shifted_moments
from nerve_hf.stats.moments import (
    MomentsLayout,
    StreamingMoments,
    common_device,
    local_m2_about,
    reduce_totals,
    sync_moments,
)

__all__ = [
    "CovarianceAccumulator",
    "sync_accumulators",
    "reduce_totals",
    "local_m2_about",
    "common_device",
    "exact_fp32_matmul",
]


class CovarianceAccumulator(StreamingMoments):
    """Running mean and covariance of ``dim``-wide rows, streamed batch by batch.

    Args:
        dim: width D of each row (the FFN hidden width).
        device: where the float64 state lives; ``None`` takes the device of the first batch.
        warn_nonfinite: warn once, at the first rows holding NaN or Inf, that rows were skipped. The
            tracker's measurements pass False: they count skips silently and the tracker warns once per
            measurement for all of its statistics (:func:`nerve_hf.tracking.windows.warn_skipped`).

    >>> acc = CovarianceAccumulator(2)
    >>> acc.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    >>> acc.update(torch.tensor([[5.0, 10.0]]))
    >>> acc.count, acc.mean().tolist(), acc.covariance().tolist()
    (3, [3.0, 6.0], [[4.0, 8.0], [8.0, 16.0]])
    """

    LAYOUT = MomentsLayout(widths=("dim",), means=("mean",), moment="m2")  # M2 = Σ (x − μ)(x − μ)ᵀ [D, D]

    def __init__(self, dim: int, device: Optional[torch.device | str] = None, *, warn_nonfinite: bool = True) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        self.dim = int(dim)
        self._warned_nonfinite = not warn_nonfinite  # a silent accumulator counts as having warned
        super().__init__((self.dim,), device)

    @property
    def count(self) -> int:
        """Number of rows in the covariance (all processes after :meth:`sync`).

        >>> acc = CovarianceAccumulator(4)
        >>> acc.update(torch.randn(2, 5, 4), mask=torch.tensor([[True] * 5, [True] * 2 + [False] * 3]))
        >>> acc.count
        7
        """
        return self.moments().count

    @property
    def skipped(self) -> int:
        """Number of rows dropped because they held NaN or Inf.

        >>> import warnings
        >>> acc = CovarianceAccumulator(2)
        >>> with warnings.catch_warnings(record=True):  # the first skip warns once (unless warn_nonfinite=False)
        ...     acc.update(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 5.0]]))
        ...     counts = acc.count, acc.skipped
        >>> counts
        (2, 1)
        """
        return self.moments().skipped

    # ---------------------------------------------------------------- update
    def update(self, x: Tensor, mask: Optional[Tensor] = None) -> None:
        """Add the rows of ``x`` (``[..., D]``); ``mask`` (bool ``[...]``) keeps only True positions.

        Any float dtype is accepted. Rows holding NaN or Inf are skipped and counted in ``skipped``.

        >>> acc = CovarianceAccumulator(3)
        >>> x = torch.randn(2, 4, 3, dtype=torch.bfloat16)  # [batch, seq, D]
        >>> acc.update(x, mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool))
        >>> acc.count, acc.covariance().dtype
        (5, torch.float64)
        """
        x = torch.as_tensor(x)
        if x.ndim == 0 or x.shape[-1] != self.dim:
            got = "a scalar" if x.ndim == 0 else f"last dimension {x.shape[-1]} (shape {tuple(x.shape)})"
            raise ValueError(f"CovarianceAccumulator(dim={self.dim}) expects rows of width {self.dim}, got {got}")
        if not x.is_floating_point():
            raise TypeError(f"activations must be floating point, got {x.dtype}")
        x = x.detach()
        if mask is not None:
            mask = torch.as_tensor(mask, device=x.device)
            if mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"mask shape {tuple(mask.shape)} must equal the leading shape of x {tuple(x.shape[:-1])}"
                )
            mask = mask.to(torch.bool)
        if x.device.type not in self.HOST_SYNC_DEVICE_TYPES:
            keep = None if mask is None else mask.reshape(-1)  # [N]
            self._update_on_device(x.reshape(-1, self.dim), keep)
        else:
            self._update_rows(x[mask] if mask is not None else x.reshape(-1, self.dim))  # [N, D]

    #: Device types on which :meth:`update` selects rows and checks them for NaN/Inf on the host (cheap
    #: there). Elsewhere the mask and the finiteness test become row weights and the counts stay on
    #: the device, so that an update never waits for the device (no ``bool(tensor)``, no ``nonzero``).
    HOST_SYNC_DEVICE_TYPES: tuple[str, ...] = ("cpu",)

    def _update_on_device(self, rows: Tensor, keep: Optional[Tensor]) -> None:
        """Sync-free update: ``rows`` ``[N, D]``; ``keep`` ``[N]`` bool or None. Rows masked out or holding
        NaN/Inf get weight 0; the dropped non-finite ones are counted on the device."""
        if rows.shape[0] == 0:
            return
        finite = torch.isfinite(rows).all(dim=-1)  # [N]
        weights = finite if keep is None else finite & keep  # [N] bool
        n_b = weights.sum(dtype=torch.float64)  # device scalar
        offered = rows.shape[0] if keep is None else keep.sum(dtype=torch.float64)
        shift, remainder_sum, scatter = shifted_moments(rows, weights, n_b)
        remainder = remainder_sum / n_b.clamp(min=1)  # [D] float64: batch mean − shift
        self._merge_moments(n_b, (shift.to(torch.float64) + remainder,), scatter, (remainder,), offered - n_b)

    def _update_rows(self, rows: Tensor) -> None:
        if rows.shape[0] == 0:
            return
        shift, remainder_sum, scatter = shifted_moments(rows)
        if not bool(torch.isfinite(remainder_sum).all()):  # a NaN/Inf anywhere reaches this sum
            rows = self._drop_nonfinite(rows)
            if rows.shape[0] == 0:
                return
            shift, remainder_sum, scatter = shifted_moments(rows)
        n = rows.shape[0]
        remainder = remainder_sum / n  # [D] float64: batch mean − shift
        self._merge_moments(n, (shift.to(torch.float64) + remainder,), scatter, (remainder,))

    def _drop_nonfinite(self, rows: Tensor) -> Tensor:
        finite = torch.isfinite(rows).all(dim=-1)  # [N]
        bad = int((~finite).sum())
        self._skipped += bad
        self._warn_nonfinite(bad, rows.shape[0], stacklevel=5)
        return rows[finite]

    def _warn_nonfinite(self, bad: int, offered: int, stacklevel: int) -> None:
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"CovarianceAccumulator(dim={self.dim}): skipped {bad} of {offered} rows holding NaN "
                f"or Inf (further skips are counted in .skipped without a warning)",
                RuntimeWarning,
                stacklevel=stacklevel,
            )

    def merge(self, other: "CovarianceAccumulator") -> "CovarianceAccumulator":
        """Fold another accumulator's rows into this one (as if they had been updated here).

        >>> rows = torch.randn(10, 3, dtype=torch.float64)
        >>> a, b, whole = CovarianceAccumulator(3), CovarianceAccumulator(3), CovarianceAccumulator(3)
        >>> a.update(rows[:4]); b.update(rows[4:]); whole.update(rows)
        >>> torch.allclose(a.merge(b).covariance(), whole.covariance()), a.count
        (True, 10)
        """
        if other.dim != self.dim:
            raise ValueError(f"cannot merge accumulators of different widths: {self.dim} and {other.dim}")
        return super().merge(other)

    # --------------------------------------------------------------- results
    def mean(self) -> Tensor:
        """Mean row, float64 ``[D]`` (NaN before any row).

        >>> acc = CovarianceAccumulator(2)
        >>> bool(acc.mean().isnan().all())
        True
        >>> acc.update(torch.tensor([[1.0, 4.0], [3.0, 8.0]]))
        >>> acc.mean().tolist()
        [2.0, 6.0]
        """
        n, _, (mean,), _ = self.moments()
        if n == 0:
            return torch.full((self.dim,), float("nan"), dtype=torch.float64, device=self._device)
        return mean.clone()

    def covariance(self) -> Tensor:
        """Unbiased covariance Σ = M2 / (n − 1), float64 ``[D, D]`` (NaN with fewer than 2 rows).

        >>> acc = CovarianceAccumulator(2)
        >>> acc.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0], [0.0, 0.0]]))
        >>> acc.covariance().tolist()
        [[0.5, 0.0], [0.0, 2.0]]
        """
        n, _, _, m2 = self.moments()
        if n < 2:
            return torch.full((self.dim, self.dim), float("nan"), dtype=torch.float64, device=self._device)
        return m2 / (n - 1)

    def eigenvalues(self) -> Tensor:
        """Eigenvalues of :meth:`covariance`, float64 ``[D]``, descending (NaN with fewer than 2 rows).

        >>> acc = CovarianceAccumulator(2)
        >>> acc.update(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0], [0.0, 0.0]]))
        >>> [round(v, 6) for v in acc.eigenvalues().tolist()]
        [2.0, 0.5]
        """
        return eigenvalues_batched([self.covariance()])[0]

    def _widths_mismatch(self, widths: tuple[int, ...]) -> str:
        return f"the state is for dim={widths[0]}, but this accumulator has dim={self.dim}."

    def __repr__(self) -> str:
        return (
            f"CovarianceAccumulator(dim={self.dim}, count={self.count}, skipped={self.skipped}, device={self._device})"
        )


def sync_accumulators(accumulators: Sequence[CovarianceAccumulator], group=None) -> None:
    """Exact cross-process sync of many accumulators with two packed all-reduces over ``group``.

    With ``k`` processes holding (n_i, μ_i, M2_i), the totals are n = Σn_i, μ = Σ n_i μ_i / n and
    M2 = Σ [M2_i + n_i (μ_i − μ)(μ_i − μ)ᵀ]: pure sums, so every process ends with the moments of all
    rows, equal to one process having seen them. A no-op on one process. ``group``: the data-parallel
    processes (default: all); never a tensor-parallel group, whose ranks hold slices of the same rows.
    :func:`~nerve_hf.stats.moments.sync_moments` does it, for accumulators of any kind.
    """
    sync_moments(accumulators, group)
