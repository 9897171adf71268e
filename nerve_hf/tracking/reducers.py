"""How a tracker's statistics are reduced across processes: one strategy, chosen at construction.

* :class:`LocalReducer`: one process, or ``group=NO_REDUCTION`` (tensor-parallel meshes that already
  hold every token): each process measures what it saw.
* :class:`SummedReducer`: statistics summed exactly over the data-parallel group, each process
  eigendecomposing its share (:func:`~nerve_hf.parallel.sharded_spectra.sharded_metric_values`); on one
  process (``torch.distributed`` not initialised when :meth:`~Reducer.measure_pairs` runs) it is local.
* :class:`SiteShardedReducer`: each process owns about 1/W of the FFNs (balanced by D²), measures them on
  its own tokens, and the rows are gathered so every process reports every FFN; nothing is summed.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from nerve_hf import spectra
from nerve_hf.parallel.comm import all_reduce_sum, is_distributed, rank, world_size
from nerve_hf.parallel.sharded_spectra import assign_owners, gather_rows, local_metric_values, sharded_metric_values
from nerve_hf.parallel.tensor_parallel import NO_REDUCTION
from nerve_hf.stats.covariance import CovarianceAccumulator, common_device, sync_accumulators
from nerve_hf.stats.cross_covariance import CrossCovarianceAccumulator, sync_cross_accumulators

__all__ = ["Reducer", "LocalReducer", "SummedReducer", "SiteShardedReducer", "choose_reducer"]

Pairs = Sequence[tuple[CovarianceAccumulator, CovarianceAccumulator]]


class Reducer:
    """The reduction strategy's verbs; this base is the local one."""

    def owns(self, index: int) -> bool:
        """Whether this process measures site ``index``."""
        return True

    def measure_pairs(self, pairs: Pairs, metrics: str, spectra_dtype: str, sites: Sequence[int]):
        """(values, spectra, counts) of accumulator pairs, pair k being one of site ``sites[k]``'s."""
        values, kept = spectra.metric_values(pairs, metrics, spectra_dtype)
        return values, kept, [first.count for first, _ in pairs]

    lost = None  # why this process's window lost rows (set by the tracker before each compute), or None

    def exchanges(self) -> bool:
        """Whether :meth:`measure_pairs` exchanges rows with other processes (then a loss anywhere is learnt
        there by every process, which all raise after the exchange)."""
        return False

    def sync(self, accumulators: Sequence[CovarianceAccumulator]) -> None:
        """Make each accumulator hold the statistics of every process it is reduced over."""

    def sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` (counts: float64, on the host) summed over the processes measuring its site: the
        data-parallel group; site-sharded, the other processes hold zeros for sites they do not own."""
        return tensor

    def sync_cross(self, accumulators: Sequence[CrossCovarianceAccumulator]) -> None:
        """:meth:`sync` for cross-covariances."""


class LocalReducer(Reducer):
    """Nothing is reduced: each process measures its own tokens."""


class SummedReducer(Reducer):
    """Exact sums over ``group`` (None: every process), each process decomposing its share."""

    def __init__(self, group=None) -> None:
        self.group = group

    def measure_pairs(self, pairs: Pairs, metrics: str, spectra_dtype: str, sites: Sequence[int]):
        if is_distributed(self.group):
            return sharded_metric_values(pairs, metrics, self.group, spectra_dtype, lost=self.lost)
        return super().measure_pairs(pairs, metrics, spectra_dtype, sites)

    def exchanges(self) -> bool:
        return is_distributed(self.group)

    def sync(self, accumulators: Sequence[CovarianceAccumulator]) -> None:
        if is_distributed(self.group):
            sync_accumulators(accumulators, self.group)

    def sync_cross(self, accumulators: Sequence[CrossCovarianceAccumulator]) -> None:
        if is_distributed(self.group):
            sync_cross_accumulators(accumulators, self.group)

    def sum(self, tensor: Tensor) -> Tensor:
        if not is_distributed(self.group):
            return tensor
        return all_reduce_sum(tensor.to(common_device([], self.group)), self.group).cpu()


class SiteShardedReducer(SummedReducer):
    """Each site measured by its owner (``owners[i]``, a rank of ``group``) on its own tokens; rows gathered."""

    def __init__(self, owners: Sequence[int], group=None) -> None:
        super().__init__(group)
        self.owners = list(owners)

    def owns(self, index: int) -> bool:
        return self.owners[index] == rank(self.group)

    def measure_pairs(self, pairs: Pairs, metrics: str, spectra_dtype: str, sites: Sequence[int]):
        me, world = rank(self.group), world_size(self.group)
        shares = [[k for k, i in enumerate(sites) if self.owners[i] == r] for r in range(world)]
        own = [pairs[k] for k in shares[me]]
        dims = [first.dim for first, _ in pairs]  # the same on every process: widths known at construction
        device = common_device([acc for pair in own for acc in pair])  # none measured here: the backend's
        values, kept, lost = local_metric_values(own, [dims[k] for k in shares[me]], metrics, spectra_dtype, self.lost)
        counts = [first.count for first, _ in own]
        return gather_rows(values, kept, counts, shares, dims, metrics, device, self.group, lost=lost)


def choose_reducer(group, site_sharded: bool, dims: Sequence[int | None], has_pairs: bool) -> Reducer:
    """The strategy for ``group`` (``NO_REDUCTION``: local) and ``site_sharded`` (which applies only
    under several processes; ``dims`` balance the owners); ValueError for site-sharded layer pairs."""
    if group == NO_REDUCTION:
        return LocalReducer()
    if site_sharded and is_distributed(group):
        if has_pairs:
            raise ValueError(
                "site_sharded does not support cross_layer: the two layers of a pair may be measured by "
                "different processes"
            )
        return SiteShardedReducer(assign_owners([d or 1 for d in dims], world_size(group), power=2), group)
    return SummedReducer(group)
