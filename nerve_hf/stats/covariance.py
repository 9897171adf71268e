"""Streaming covariance of activations with exact merging across batches and processes.

Moments, merge and sync only; :mod:`nerve_hf.spectra` turns covariances into eigenvalues and metrics.

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
multiplied and the rest is mirrored (:func:`_add_upper_gram`): about half the FLOPs of one ``xᵀx``
(benchmarks/perf/accumulator_throughput.py measures it against that GEMM). Batches merge into float64
running moments with the parallel update of Chan, Golub & LeVeque (1979)::

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δδᵀ n_a n_b / n

Raw Σxxᵀ is never accumulated: post-activation values have large means and Σxxᵀ − nμμᵀ cancels.
Memory is one float64 ``[D, D]`` matrix and one ``[D]`` vector per accumulator, whatever the number
of tokens.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from nerve_hf.parallel.comm import all_reduce_sum, is_distributed
from nerve_hf.spectra import eigenvalues_batched
from nerve_hf.stats.kernels import add_scatter_and_low_rank, exact_fp32_matmul, shifted_moments

__all__ = [
    "CovarianceAccumulator",
    "sync_accumulators",
    "reduce_totals",
    "local_m2_about",
    "common_device",
    "exact_fp32_matmul",
]


class CovarianceAccumulator:
    """Running mean and covariance of ``dim``-wide rows, streamed batch by batch.

    Args:
        dim: width D of each row (the FFN hidden width).
        device: where the float64 state lives; ``None`` takes the device of the first batch.

    >>> acc = CovarianceAccumulator(2)
    >>> acc.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    >>> acc.update(torch.tensor([[5.0, 10.0]]))
    >>> acc.count, acc.mean().tolist(), acc.covariance().tolist()
    (3, [3.0, 6.0], [[4.0, 8.0], [8.0, 16.0]])
    """

    def __init__(self, dim: int, device: Optional[torch.device | str] = None) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        self.dim = int(dim)
        self._device = torch.device(device) if device is not None else None
        self._warned_nonfinite = False
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every row seen so far (keeps dim and device).

        >>> acc = CovarianceAccumulator(3)
        >>> acc.update(torch.ones(4, 3))
        >>> acc.reset()
        >>> acc.count, acc.dim
        (0, 3)
        """
        self._rows_read = 0  # rows merged on this process, as far as the host has read them
        self._skipped_read = 0  # non-finite rows dropped on this process, likewise
        self._pending: Optional[Tensor] = None  # [2] float64 on the device: rows, skipped not yet read
        self._mean: Optional[Tensor] = None  # [D] float64, allocated on first use
        self._m2: Optional[Tensor] = None  # [D, D] float64: Σ (x − μ)(x − μ)ᵀ
        self._global: Optional[tuple[int, int, Tensor, Tensor]] = None  # state after sync()

    def _allocate(self, device: torch.device) -> None:
        if self._device is None:
            self._device = device
        self._mean = torch.zeros(self.dim, dtype=torch.float64, device=self._device)
        self._m2 = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self._device)

    @property
    def device(self) -> Optional[torch.device]:
        return self._device

    # Counts merged on the device (the sync-free path) stay there until something on the host reads
    # them: reading costs one device-to-host copy, done when a result or a sync asks, never in update().
    @property
    def _n(self) -> int:
        return self._read_pending()[0]

    @_n.setter
    def _n(self, value: int) -> None:
        self._read_pending()
        self._rows_read = value

    @property
    def _skipped(self) -> int:
        return self._read_pending()[1]

    @_skipped.setter
    def _skipped(self, value: int) -> None:
        self._read_pending()
        self._skipped_read = value

    def _read_pending(self) -> tuple[int, int]:
        """(rows, skipped) with the device's pending counts folded in; warns once about skipped rows."""
        if self._pending is not None:
            rows, skipped = (int(value) for value in self._pending.tolist())  # the one host sync
            self._pending = None
            self._rows_read += rows
            self._skipped_read += skipped
            if skipped:
                self._warn_nonfinite(skipped, rows + skipped, stacklevel=5)
        return self._rows_read, self._skipped_read

    def _state(self) -> tuple[int, int, Optional[Tensor], Optional[Tensor]]:
        """(count, skipped, mean, m2): the synced totals after :meth:`sync`, else this process's."""
        return self._global if self._global is not None else (self._n, self._skipped, self._mean, self._m2)

    @property
    def count(self) -> int:
        """Number of rows in the covariance (all processes after :meth:`sync`).

        >>> acc = CovarianceAccumulator(4)
        >>> acc.update(torch.randn(2, 5, 4), mask=torch.tensor([[True] * 5, [True] * 2 + [False] * 3]))
        >>> acc.count
        7
        """
        return self._state()[0]

    @property
    def skipped(self) -> int:
        """Number of rows dropped because they held NaN or Inf.

        >>> import warnings
        >>> acc = CovarianceAccumulator(2)
        >>> with warnings.catch_warnings(record=True):  # the first skip warns once
        ...     acc.update(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 5.0]]))
        ...     counts = acc.count, acc.skipped
        >>> counts
        (2, 1)
        """
        return self._state()[1]

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
        self._merge_moments(n_b, shift.to(torch.float64) + remainder, scatter, remainder, offered - n_b)

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
        self._merge_moments(n, shift.to(torch.float64) + remainder, scatter, remainder)

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

    def _merge_moments(
        self,
        n_b: int | Tensor,
        mean_b: Tensor,
        m2_b: Tensor,
        remainder: Optional[Tensor] = None,
        skipped_b: Optional[Tensor] = None,
    ) -> None:
        """Chan et al.'s parallel update of (n, μ, M2) with a batch's (n_b, μ_b, M2_b).

        ``m2_b`` may be a lower-precision scatter about ``μ_b − remainder`` instead of about ``μ_b``;
        its correction −n_b·remainder·remainderᵀ is then applied here in float64, in the same
        rank-2 update as the merge's own δδᵀ term (one pass over the float64 state). ``n_b`` is an
        int, or a float64 device scalar on the sync-free path (``skipped_b`` then counts the dropped
        rows), whose counts join ``_pending`` without being read.
        """
        self._global = None
        if self._mean is None:
            self._allocate(mean_b.device)
        mean_b, m2_b = mean_b.to(self._device), m2_b.to(self._device)
        on_device = isinstance(n_b, Tensor)
        if on_device:  # state in host memory (state_device="cpu"): the copy there is the one wait
            n_b, skipped_b = n_b.to(self._device), torch.as_tensor(skipped_b).to(self._device)
        n_a = self._rows_read + self._pending[0] if on_device and self._pending is not None else self._n
        n = n_a + n_b
        delta = mean_b - self._mean  # [D]
        if on_device:  # tensor counts; a batch may be all masked, so n may be 0
            weight_b = n_b / n.clamp(min=1)
            self._mean.add_(delta * weight_b)
        else:
            weight_b = n_b / n
            self._mean.add_(delta, alpha=weight_b)
        left, right = delta[:, None], delta[None, :] * (n_a * weight_b)  # [D, 1], [1, D]
        if remainder is not None:
            remainder = remainder.to(self._device)
            left = torch.cat([left, remainder[:, None]], dim=1)  # [D, 2]
            right = torch.cat([right, remainder[None, :] * -n_b])  # [2, D]
        add_scatter_and_low_rank(self._m2, m2_b, left, right)
        if on_device:
            counts = torch.stack([n_b, skipped_b.to(torch.float64)])  # [2]
            self._pending = counts if self._pending is None else self._pending + counts
        else:
            self._n = n

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
        n, skipped, mean, m2 = other._n, other._skipped, other._mean, other._m2
        self._skipped += skipped
        if n > 0:
            self._merge_moments(n, mean, m2)
        return self

    # ------------------------------------------------------------------ sync
    def sync(self, group=None) -> None:
        """Sum the statistics of all processes of ``group`` (default: all) exactly; a no-op on one process.

        This process's own rows stay as they were, so calling ``sync`` again, or updating and
        syncing later, never counts a row twice.

        >>> acc = CovarianceAccumulator(2)
        >>> acc.update(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> acc.sync()  # one process: nothing to sum
        >>> acc.count, acc.mean().tolist()
        (2, [1.0, 2.0])
        """
        sync_accumulators([self], group)

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
        n, _, mean, _ = self._state()
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
        n, _, _, m2 = self._state()
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

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """This process's own statistics (never the synced totals), as CPU tensors.

        >>> acc = CovarianceAccumulator(2)
        >>> acc.update(torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 1.0]]))
        >>> state = acc.state_dict()
        >>> sorted(state), state["count"], tuple(state["m2"].shape)
        (['count', 'dim', 'm2', 'mean', 'skipped'], 3, (2, 2))
        """
        mean = self._mean if self._mean is not None else torch.zeros(self.dim, dtype=torch.float64)
        m2 = self._m2 if self._m2 is not None else torch.zeros(self.dim, self.dim, dtype=torch.float64)
        return {
            "dim": self.dim,
            "count": self._n,
            "skipped": self._skipped,
            "mean": mean.detach().cpu().clone(),
            "m2": m2.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; an invalid ``state`` raises ``ValueError``, changing nothing.

        ``state`` needs ``dim`` (this accumulator's), ``count`` and ``skipped`` (non-negative integers),
        ``mean`` ``[D]`` and ``m2`` ``[D, D]`` (floating tensors, finite when ``count > 0``).

        >>> acc = CovarianceAccumulator(2)
        >>> acc.update(torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 1.0]]))
        >>> restored = CovarianceAccumulator(2)
        >>> restored.load_state_dict(acc.state_dict())
        >>> restored.count, torch.equal(restored.covariance(), acc.covariance())
        (3, True)
        >>> CovarianceAccumulator(3).load_state_dict(acc.state_dict())
        Traceback (most recent call last):
        ...
        ValueError: ...
        """
        count, skipped, mean, m2 = _checked_state(state, self.dim)
        self.reset()
        self._skipped = skipped
        if count > 0:
            self._allocate(self._device or torch.device("cpu"))
            self._n = count
            self._mean.copy_(mean)
            self._m2.copy_(m2)

    def __repr__(self) -> str:
        return (
            f"CovarianceAccumulator(dim={self.dim}, count={self.count}, skipped={self.skipped}, device={self._device})"
        )


def _checked_state(state: Mapping[str, Any], dim: int) -> tuple[int, int, Tensor, Tensor]:
    """(count, skipped, mean [D], m2 [D, D]) of a :meth:`CovarianceAccumulator.state_dict`, each checked."""
    where = "CovarianceAccumulator.load_state_dict:"
    shapes = {"mean": (dim,), "m2": (dim, dim)}
    integers = checked_integers(state, where, ("dim", "count", "skipped"), shapes)
    if integers["dim"] != dim:
        raise ValueError(f"{where} the state is for dim={integers['dim']}, but this accumulator has dim={dim}.")
    checked_tensors(state, where, shapes, integers["count"])
    return integers["count"], integers["skipped"], state["mean"], state["m2"]


def checked_integers(
    state: Mapping[str, Any], where: str, integer_keys: Sequence[str], tensor_keys: Iterable[str] = ()
) -> dict[str, int]:
    """``integer_keys`` of an accumulator's state dict as non-negative ints, after checking that these and
    ``tensor_keys`` are all there. Integers may be Python, NumPy or 0-d torch scalars, or integral floats;
    never bools. A problem raises ``ValueError`` starting with ``where`` and naming the field."""
    missing = [key for key in (*integer_keys, *tensor_keys) if key not in state]
    if missing:
        raise ValueError(f"{where} the state has no {', '.join(map(repr, missing))} (keys: {sorted(map(str, state))}).")
    integers = {}
    for key in integer_keys:
        value = state[key]
        scalar = value.item() if isinstance(value, Tensor) and value.ndim == 0 else value
        integral = isinstance(scalar, numbers.Integral) or (
            isinstance(scalar, numbers.Real) and float(scalar).is_integer()
        )
        if isinstance(scalar, bool) or not integral or scalar < 0:
            raise ValueError(f"{where} state[{key!r}] must be a non-negative integer, got {value!r}.")
        integers[key] = int(scalar)
    return integers


def checked_tensors(state: Mapping[str, Any], where: str, shapes: Mapping[str, tuple], count: int) -> None:
    """Check that each ``state[key]`` of ``shapes`` is a floating tensor of that shape, finite when ``count > 0``."""
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{where} state[{key!r}] must be a tensor, got {type(value).__name__}.")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where} state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(shape)}.")
        if not value.is_floating_point():
            raise ValueError(f"{where} state[{key!r}] must be floating point, got {value.dtype}.")
        if count > 0 and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where} state[{key!r}] holds NaN or Inf, but count is {count}.")


def sync_accumulators(accumulators: Sequence[CovarianceAccumulator], group=None) -> None:
    """Exact cross-process sync of many accumulators with two packed all-reduces over ``group``.

    With ``k`` processes holding (n_i, μ_i, M2_i), the totals are n = Σn_i, μ = Σ n_i μ_i / n and
    M2 = Σ [M2_i + n_i (μ_i − μ)(μ_i − μ)ᵀ]: pure sums, so every process ends with the moments of all
    rows, equal to one process having seen them. A no-op on one process. ``group``: the data-parallel
    processes (default: all); never a tensor-parallel group, whose ranks hold slices of the same rows.
    """
    if not is_distributed(group) or not accumulators:
        return
    device = common_device(accumulators)
    totals = reduce_totals(accumulators, device, group)
    # Reduction 2: each process's M2 moved to the global mean, flattened and packed.
    second = torch.cat(
        [local_m2_about(acc, global_mean, device).reshape(-1) for acc, (_, _, global_mean) in zip(accumulators, totals)]
    )
    all_reduce_sum(second, group)
    offset = 0
    for acc, (n, skipped, global_mean) in zip(accumulators, totals):
        m2 = second[offset : offset + acc.dim * acc.dim].view(acc.dim, acc.dim)
        offset += acc.dim * acc.dim
        acc._global = (n, skipped, global_mean.to(acc._device or device), m2.to(acc._device or device))


def reduce_totals(
    accumulators: Sequence[CovarianceAccumulator], device: torch.device, group=None
) -> list[tuple[int, int, Tensor]]:
    """Reduction 1 of a sync: (n, skipped, global mean ``[D]`` float64) of each accumulator over ``group``,
    from one packed all-reduce of ``[n, skipped, n·μ]`` per accumulator."""
    first = torch.cat(
        [
            torch.cat(
                [
                    torch.tensor([acc._n, acc._skipped], dtype=torch.float64, device=device),
                    _local_mean(acc, device) * acc._n,
                ]
            )
            for acc in accumulators
        ]
    )
    all_reduce_sum(first, group)
    counts = first.cpu()  # one device-to-host copy for all the counts
    totals = []
    offset = 0
    for acc in accumulators:
        n, skipped = int(counts[offset]), int(counts[offset + 1])
        weighted_mean = first[offset + 2 : offset + 2 + acc.dim]
        totals.append((n, skipped, weighted_mean / max(n, 1)))
        offset += acc.dim + 2
    return totals


def common_device(accumulators: Iterable[CovarianceAccumulator]) -> torch.device:
    devices = {acc.device for acc in accumulators if acc.device is not None}
    if len(devices) > 1:
        raise ValueError(f"accumulators synced together must share one device, got {sorted(map(str, devices))}")
    if devices:
        return devices.pop()
    # No process-local rows anywhere: NCCL needs CUDA tensors, gloo takes CPU ones.
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _local_mean(acc: CovarianceAccumulator, device: torch.device) -> Tensor:
    if acc._mean is None:
        return torch.zeros(acc.dim, dtype=torch.float64, device=device)
    return acc._mean.to(device)


def local_m2_about(acc: CovarianceAccumulator, global_mean: Tensor, device: torch.device) -> Tensor:
    """M2_i + n_i (μ_i − μ)(μ_i − μ)ᵀ: this process's scatter about the global mean.  -> [D, D]"""
    if acc._n == 0:
        return torch.zeros(acc.dim, acc.dim, dtype=torch.float64, device=device)
    delta = acc._mean.to(device) - global_mean  # [D]
    return torch.addr(acc._m2.to(device), delta, delta, alpha=acc._n)
