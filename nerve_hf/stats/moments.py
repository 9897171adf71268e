"""Streaming moments with a declared, exact reduction: the base of the covariance accumulators.

A subclass of :class:`StreamingMoments` declares its state once, in a :class:`MomentsLayout`: the count n,
the skipped count, one float64 mean vector per width, and one float64 second-moment matrix whose rows and
columns are the deviations from two of those means (M2 = Σ(x − μ)(x − μ)ᵀ for a covariance,
C = Σ(x − μ_x)(y − μ_y)ᵀ for a cross-covariance). The subclass forms each batch's (n_b, means_b, M2_b);
the base owns everything else:

- lazy allocation on the first batch's device, :meth:`~StreamingMoments.reset`;
- the merge of Chan, Golub & LeVeque (1979), for second-moment rows a and columns b::

      n = n_a + n_b,  δ = μ_b − μ_a (per mean),  μ = μ_a + δ n_b / n,  M2 = M2_a + M2_b + δ_a δ_bᵀ n_a n_b / n

- counts merged on the device (the sync-free path), kept there until something on the host reads them;
- :meth:`~StreamingMoments.state_dict` / :meth:`~StreamingMoments.load_state_dict` with checked fields;
- the exact cross-process sync of many accumulators at once (:func:`sync_moments`), two packed all-reduces:
  ``[n, skipped, n·μ...]`` per accumulator gives the global means, then each process's M2 moved to them::

      n = Σ n_i,  μ = Σ n_i μ_i / n,  M2 = Σ [M2_i + n_i (μ_a,i − μ_a)(μ_b,i − μ_b)ᵀ]

  pure sums, so every process ends with the moments of all rows, equal to one process having seen them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from nerve_hf.parallel import comm
from nerve_hf.stats.kernels import add_scatter_and_low_rank
from nerve_hf.stats.state_checks import checked_integers, checked_tensors

__all__ = [
    "MomentsLayout",
    "Moments",
    "Totals",
    "StreamingMoments",
    "sync_moments",
    "reduce_totals",
    "local_m2_about",
    "common_device",
]


@dataclass(frozen=True)
class MomentsLayout:
    """The state a :class:`StreamingMoments` subclass keeps, by its ``state_dict`` keys.

    Args:
        widths: keys of the widths, e.g. ``("dim_x", "dim_y")``; the values are given to ``__init__``.
        means: keys of the float64 mean vectors, one per width (``means[i]`` is ``[widths[i]]``).
        moment: key of the float64 second moment ``[widths[a], widths[b]]``.
        moment_of: (a, b): its rows are deviations from mean a, its columns from mean b.
    """

    widths: tuple[str, ...]
    means: tuple[str, ...]
    moment: str
    moment_of: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if len(self.means) != len(self.widths) or not all(0 <= i < len(self.means) for i in self.moment_of):
            raise ValueError(f"a MomentsLayout needs one mean per width and a moment of two of them, got {self}")


class Moments(NamedTuple):
    """Count, skipped count, means (float64 ``[width]`` each) and second moment (float64 ``[A, B]``)."""

    count: int
    skipped: int
    means: tuple[Optional[Tensor], ...]
    m2: Optional[Tensor]


class Totals(NamedTuple):
    """Reduction 1 of a sync: the global count, skipped count and means (float64 ``[width]`` each)."""

    count: int
    skipped: int
    means: tuple[Tensor, ...]


class StreamingMoments:
    """Running count, means and second moment, merged batch by batch and summed across processes exactly.

    Subclasses set :attr:`LAYOUT`, form each batch's moments and hand them to :meth:`_merge_moments`.

    Args:
        widths: one width per mean, in the order of ``LAYOUT.means``.
        device: where the float64 state lives; ``None`` takes the device of the first batch.
    """

    LAYOUT: ClassVar[MomentsLayout]

    def __init__(self, widths: Sequence[int], device: Optional[torch.device | str] = None) -> None:
        self.widths = tuple(int(width) for width in widths)
        self._device = torch.device(device) if device is not None else None
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget every row seen so far (keeps the widths and device).

        >>> from nerve_hf.stats.covariance import CovarianceAccumulator
        >>> acc = CovarianceAccumulator(3)
        >>> acc.update(torch.ones(4, 3))
        >>> acc.reset()
        >>> acc.count, acc.dim
        (0, 3)
        """
        self._rows_read = 0  # rows merged on this process, as far as the host has read them
        self._skipped_read = 0  # non-finite rows dropped on this process, likewise
        self._pending: Optional[Tensor] = None  # [2] float64 on the device: rows, skipped not yet read
        self._means: Optional[tuple[Tensor, ...]] = None  # [width] float64 each, allocated on first use
        self._m2: Optional[Tensor] = None  # [A, B] float64: Σ (x_a − μ_a)(x_b − μ_b)ᵀ
        self._global: Optional[Moments] = None  # the totals of all processes after sync()

    def _allocate(self, device: torch.device) -> None:
        if self._device is None:
            self._device = device
        self._means = tuple(torch.zeros(width, dtype=torch.float64, device=self._device) for width in self.widths)
        self._m2 = torch.zeros(self.m2_shape, dtype=torch.float64, device=self._device)

    @property
    def device(self) -> Optional[torch.device]:
        return self._device

    @property
    def m2_shape(self) -> tuple[int, int]:
        """``[A, B]``: the widths of the second moment's rows and columns."""
        rows, cols = self.LAYOUT.moment_of
        return self.widths[rows], self.widths[cols]

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
        """(rows, skipped) with the device's pending counts folded in; reports skipped rows."""
        if self._pending is not None:
            rows, skipped = (int(value) for value in self._pending.tolist())  # the one host sync
            self._pending = None
            self._rows_read += rows
            self._skipped_read += skipped
            if skipped:
                self._warn_nonfinite(skipped, rows + skipped, stacklevel=5)
        return self._rows_read, self._skipped_read

    def _warn_nonfinite(self, bad: int, offered: int, stacklevel: int) -> None:
        """Called when ``bad`` of ``offered`` rows were skipped; subclasses that warn override it."""

    def moments(self) -> Moments:
        """The statistics results are read from: the synced totals after :meth:`sync`, else this process's."""
        if self._global is not None:
            return self._global
        return Moments(self._n, self._skipped, self._means or (None,) * len(self.widths), self._m2)

    # ----------------------------------------------------------------- merge
    def _merge_moments(
        self,
        n_b: int | Tensor,
        means_b: Sequence[Tensor],
        m2_b: Tensor,
        remainders: Optional[Sequence[Tensor]] = None,
        skipped_b: Optional[Tensor] = None,
    ) -> None:
        """Chan et al.'s parallel update of (n, μ..., M2) with a batch's (n_b, μ_b..., M2_b).

        ``m2_b`` may be a lower-precision scatter about ``μ_b − remainder`` (one remainder per mean)
        instead of about ``μ_b``; its correction −n_b·r_a·r_bᵀ is then applied here in float64, in the
        same rank-2 update as the merge's own δ_a·δ_bᵀ term (one pass over the float64 state). ``n_b`` is
        an int, or a float64 device scalar on the sync-free path (``skipped_b`` then counts the dropped
        rows), whose counts join ``_pending`` without being read.
        """
        self._global = None
        if self._means is None:
            self._allocate(means_b[0].device)
        means_b, m2_b = [mean.to(self._device) for mean in means_b], m2_b.to(self._device)
        on_device = isinstance(n_b, Tensor)
        if on_device:  # state in host memory (state_device="cpu"): the copy there is the one wait
            n_b, skipped_b = n_b.to(self._device), torch.as_tensor(skipped_b).to(self._device)
        n_a = self._rows_read + self._pending[0] if on_device and self._pending is not None else self._n
        n = n_a + n_b
        deltas = [mean_b - mean for mean_b, mean in zip(means_b, self._means)]  # [width] each
        if on_device:  # tensor counts; a batch may be all masked, so n may be 0
            weight_b = n_b / n.clamp(min=1)
            for mean, delta in zip(self._means, deltas):
                mean.add_(delta * weight_b)
        else:
            weight_b = n_b / n
            for mean, delta in zip(self._means, deltas):
                mean.add_(delta, alpha=weight_b)
        a, b = self.LAYOUT.moment_of
        left, right = deltas[a][:, None], deltas[b][None, :] * (n_a * weight_b)  # [A, 1], [1, B]
        if remainders is not None:
            remainder_a, remainder_b = remainders[a].to(self._device), remainders[b].to(self._device)
            left = torch.cat([left, remainder_a[:, None]], dim=1)  # [A, 2]
            right = torch.cat([right, remainder_b[None, :] * -n_b])  # [2, B]
        add_scatter_and_low_rank(self._m2, m2_b, left, right)
        if on_device:
            counts = torch.stack([n_b, skipped_b.to(torch.float64)])  # [2]
            self._pending = counts if self._pending is None else self._pending + counts
        else:
            self._n = n

    def merge(self, other: StreamingMoments) -> StreamingMoments:
        """Fold ``other``'s own rows (not its synced totals) into this accumulator's, as if updated here."""
        if other.LAYOUT != self.LAYOUT or other.widths != self.widths:
            kinds = f"{type(other).__name__}{other.widths} into {type(self).__name__}{self.widths}"
            raise ValueError(f"cannot merge {kinds}: the kinds or widths differ")
        n, skipped = other._n, other._skipped
        self._skipped += skipped
        if n > 0:
            self._merge_moments(n, other._means, other._m2)
        return self

    # ------------------------------------------------------------------ sync
    def sync(self, group=None) -> None:
        """Sum the statistics of all processes of ``group`` (default: all) exactly; a no-op on one process.

        This process's own rows stay as they were, so calling ``sync`` again, or updating and
        syncing later, never counts a row twice.

        >>> from nerve_hf.stats.covariance import CovarianceAccumulator
        >>> acc = CovarianceAccumulator(2)
        >>> acc.update(torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
        >>> acc.sync()  # one process: nothing to sum
        >>> acc.count, acc.mean().tolist()
        (2, [1.0, 2.0])
        """
        sync_moments([self], group)

    def local_totals(self, device: torch.device) -> Tensor:
        """This process's ``[n, skipped, n·μ...]``, float64 on ``device``: its part of reduction 1."""
        n = self._n
        means = self._means or [torch.zeros(width, dtype=torch.float64, device=device) for width in self.widths]
        counts = torch.tensor([n, self._skipped], dtype=torch.float64, device=device)
        return torch.cat([counts, *(mean.to(device) * n for mean in means)])

    def m2_about(self, means: Sequence[Tensor], device: torch.device) -> Tensor:
        """M2_i + n_i (μ_a,i − μ_a)(μ_b,i − μ_b)ᵀ: this process's second moment about ``means`` (the global
        means of reduction 1), on ``device``: its part of reduction 2.  -> ``[A, B]``"""
        n = self._n
        if n == 0:
            return torch.zeros(self.m2_shape, dtype=torch.float64, device=device)
        a, b = self.LAYOUT.moment_of
        deltas = {i: self._means[i].to(device) - means[i] for i in (a, b)}  # [width] each
        return torch.addr(self._m2.to(device), deltas[a], deltas[b], alpha=n)

    def set_global(self, moments: Moments) -> None:
        """Keep ``moments`` (the totals of all processes) as what results read until the next update;
        this process's own statistics are unchanged."""
        target = self._device or moments.m2.device
        means = tuple(mean.to(target) for mean in moments.means)
        self._global = Moments(moments.count, moments.skipped, means, moments.m2.to(target))

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """This process's own statistics (never the synced totals), as CPU tensors.

        >>> from nerve_hf.stats.covariance import CovarianceAccumulator
        >>> acc = CovarianceAccumulator(2)
        >>> acc.update(torch.tensor([[1.0, 2.0], [3.0, 5.0], [0.0, 1.0]]))
        >>> state = acc.state_dict()
        >>> sorted(state), state["count"], tuple(state["m2"].shape)
        (['count', 'dim', 'm2', 'mean', 'skipped'], 3, (2, 2))
        """
        layout = self.LAYOUT
        if self._means is not None:
            means, m2 = self._means, self._m2
        else:
            means = [torch.zeros(width, dtype=torch.float64) for width in self.widths]
            m2 = torch.zeros(self.m2_shape, dtype=torch.float64)
        state: dict[str, Any] = dict(zip(layout.widths, self.widths))
        state.update(count=self._n, skipped=self._skipped)
        state.update({key: mean.detach().cpu().clone() for key, mean in zip(layout.means, means)})
        state[layout.moment] = m2.detach().cpu().clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; an invalid ``state`` raises ``ValueError``, changing nothing.

        ``state`` needs the widths (this accumulator's), ``count`` and ``skipped`` (non-negative integers),
        the means and the second moment (floating tensors of their shapes, finite when ``count > 0``).

        >>> from nerve_hf.stats.covariance import CovarianceAccumulator
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
        layout, where = self.LAYOUT, f"{type(self).__name__}.load_state_dict:"
        shapes = {key: (width,) for key, width in zip(layout.means, self.widths)}
        shapes[layout.moment] = self.m2_shape
        integers = checked_integers(state, where, (*layout.widths, "count", "skipped"), shapes)
        widths = tuple(integers[key] for key in layout.widths)
        if widths != self.widths:
            raise ValueError(f"{where} {self._widths_mismatch(widths)}")
        checked_tensors(state, where, shapes, integers["count"])
        self.reset()
        self._skipped = integers["skipped"]
        if integers["count"] > 0:
            self._allocate(self._device or torch.device("cpu"))
            self._n = integers["count"]
            for mean, key in zip(self._means, layout.means):
                mean.copy_(state[key])
            self._m2.copy_(state[layout.moment])

    def _widths_mismatch(self, widths: tuple[int, ...]) -> str:
        """The sentence :meth:`load_state_dict` raises for a state of other ``widths``."""
        return f"the state is for widths {widths}, but this accumulator has {self.widths}."


def sync_moments(accumulators: Sequence[StreamingMoments], group=None) -> None:
    """Exact cross-process sync of many accumulators (of any kinds) with two packed all-reduces over ``group``.

    Reduction 1 (:func:`reduce_totals`) gives each accumulator's global count and means; reduction 2 sums
    each process's second moment moved to those means (:meth:`StreamingMoments.m2_about`). Every
    accumulator then reads the totals (:meth:`StreamingMoments.set_global`) and keeps its own rows. A no-op
    on one process. ``group``: the data-parallel processes (default: all); never a tensor-parallel group,
    whose ranks hold slices of the same rows.
    """
    if not comm.is_distributed(group) or not accumulators:
        return
    device = common_device(accumulators, group)
    totals = reduce_totals(accumulators, device, group)
    # Reduction 2: each process's M2 moved to the global means, flattened and packed.
    second = torch.cat([acc.m2_about(total.means, device).reshape(-1) for acc, total in zip(accumulators, totals)])
    comm.all_reduce_sum(second, group)
    offset = 0
    for acc, total in zip(accumulators, totals):
        rows, cols = acc.m2_shape
        m2 = second[offset : offset + rows * cols].view(rows, cols)
        offset += rows * cols
        acc.set_global(Moments(total.count, total.skipped, total.means, m2))


def reduce_totals(accumulators: Sequence[StreamingMoments], device: torch.device, group=None) -> list[Totals]:
    """Reduction 1 of a sync: each accumulator's (count, skipped, global means) over ``group``, from one
    packed all-reduce of ``[n, skipped, n·μ...]`` per accumulator (float64 on ``device``)."""
    first = torch.cat([acc.local_totals(device) for acc in accumulators])
    comm.all_reduce_sum(first, group)
    counts = first.cpu()  # one device-to-host copy for all the counts
    totals, offset = [], 0
    for acc in accumulators:
        n, skipped = int(counts[offset]), int(counts[offset + 1])
        offset += 2
        means = []
        for width in acc.widths:
            means.append(first[offset : offset + width] / max(n, 1))  # Σ n_i μ_i / n
            offset += width
        totals.append(Totals(n, skipped, tuple(means)))
    return totals


def local_m2_about(acc: StreamingMoments, means: Sequence[Tensor], device: torch.device) -> Tensor:
    """``acc``'s second moment about the global ``means`` (:attr:`Totals.means`).  -> ``[A, B]``"""
    return acc.m2_about(means, device)


def common_device(accumulators: Iterable[StreamingMoments], group=None) -> torch.device:
    """The one device of the accumulators that hold rows; with none, the device ``group``'s backend
    reduces on (NCCL needs CUDA tensors, gloo takes CPU ones)."""
    devices = {acc.device for acc in accumulators if acc.device is not None}
    if len(devices) > 1:
        raise ValueError(f"accumulators synced together must share one device, got {sorted(map(str, devices))}")
    if devices:
        return devices.pop()
    backend = torch.distributed.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
