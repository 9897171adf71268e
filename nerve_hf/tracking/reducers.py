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

from nerve_hf import spectra
from nerve_hf.parallel.comm import any_true, is_distributed, rank, world_size
from nerve_hf.parallel.sharded_spectra import assign_owners, gather_rows, sharded_metric_values
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

    def any_lost(self, lost: bool) -> bool:
        """Whether any process reduced with this one lost rows (``lost``: this process did). Collective."""
        return lost

    def sync(self, accumulators: Sequence[CovarianceAccumulator]) -> None:
        """Make each accumulator hold the statistics of every process it is reduced over."""

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
            return sharded_metric_values(pairs, metrics, self.group, spectra_dtype)
        return super().measure_pairs(pairs, metrics, spectra_dtype, sites)

    def any_lost(self, lost: bool) -> bool:
        return any_true(lost, self.group)

    def sync(self, accumulators: Sequence[CovarianceAccumulator]) -> None:
        if is_distributed(self.group):
            sync_accumulators(accumulators, self.group)

    def sync_cross(self, accumulators: Sequence[CrossCovarianceAccumulator]) -> None:
        if is_distributed(self.group):
            sync_cross_accumulators(accumulators, self.group)


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
        values, kept = spectra.metric_values(own, metrics, spectra_dtype)
        device = common_device([acc for pair in own for acc in pair])  # none measured here: the backend's
        dims = [first.dim for first, _ in pairs]  # the same on every process: widths known at construction
        counts = [first.count for first, _ in own]
        return gather_rows(values, kept, counts, shares, dims, metrics, device, self.group)


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
