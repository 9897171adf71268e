"""Sharded spectra: after the exact reduction, each process decomposes only its share of the FFNs.

A tracker under ``torch.distributed`` measures M sites (each a pre and a post covariance) with W
processes. Instead of all-reducing every covariance and having every process decompose all 2M of them:

1. one all-reduce of ``[n, skipped, n·μ]`` per covariance gives every process the counts and global means
   (:func:`nerve_hf.stats.moments.reduce_totals`);
2. the sites are dealt to the processes so that each gets about the same eigendecomposition work
   (cost ~ D³, :func:`assign_owners`);
3. one reduce-scatter of the covariances' upper triangles, moved to the global mean
   (:meth:`~nerve_hf.stats.moments.StreamingMoments.m2_about`), delivers to each
   process the exact sum of only the covariances it decomposes;
4. each process eigendecomposes and summarises its share (:func:`nerve_hf.spectra.metric_values`);
5. one all-gather of the metric rows (and spectra) gives every process every row, so all log the same.

Bytes each process contributes per measurement, with K the largest share in float64 elements:
reduction 1: Σ (D + 2) · 8; reduce-scatter: W · K · 8, K = max over processes of
Σ_{owned sites} D(D + 1) (two triangles of D(D + 1)/2), or, when that buffer would be more than twice
the real data (more processes than FFNs), one reduce per owner: Σ D(D + 1) · 8; all-gather: max over
processes of Σ_{owned sites} (8 + 2D) · 8 (a count, seven metrics, two spectra; 8 + 0 with
``metrics="pr"``), plus 8 bytes: whether the process lost its rows. :func:`exchange_bytes` computes them.

A failure on one process never leaves the others waiting in a collective: every local step between the
exchanges is guarded, a failed one contributes zeros or NaN rows of the same size, the exchanges go on, and
after the all-gather every process raises :class:`RowsLostError` naming the processes that failed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.parallel import comm as distributed
from nerve_hf.spectra import metric_values
from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.stats.moments import common_device, reduce_totals

__all__ = [
    "assign_owners",
    "sharded_metric_values",
    "gather_rows",
    "local_metric_values",
    "exchange_bytes",
    "RowsLostError",
]


class RowsLostError(RuntimeError):
    """Some process lost its rows of a measurement (a failed hook or eigendecomposition); raised by every
    process after the exchange, so all of them agree that the measurement is lost."""


_N_METRICS = len(METRIC_NAMES)


def assign_owners(dims: Sequence[int], world: int, power: int = 3) -> list[int]:
    """The process that handles each site: largest first, to the least loaded (cost D**power: 3 for
    eigendecompositions, 2 for state; ties to the lower rank). Deterministic, so every process computes
    the same assignment.

    >>> assign_owners([8, 8, 8, 2], 2)
    [0, 1, 0, 1]
    """
    load = [0] * world
    owners = [0] * len(dims)
    for index in sorted(range(len(dims)), key=lambda i: (-dims[i], i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[index] = owner
        load[owner] += dims[index] ** power
    return owners


def _payload(dim: int, metrics: str) -> int:
    """float64 elements gathered per site: its row count, seven metrics, and both spectra for "all"."""
    return 1 + _N_METRICS + (2 * dim if metrics != "pr" else 0)


def _uses_reduce_scatter(share_sizes: Sequence[int]) -> bool:
    """One reduce-scatter pads every share to the largest; with more processes than FFNs most of that
    buffer would be padding, so at more than twice the real data a reduce per owner is used instead."""
    return len(share_sizes) * max(share_sizes) <= 2 * sum(share_sizes)


def exchange_bytes(dims: Sequence[int], world: int, metrics: str = "all") -> dict[str, int]:
    """Bytes each process contributes to the exchanges of one measurement (see the module doc): the
    totals' all-reduce, the triangles' reduce-scatter (or reduces, one per owner), the rows' all-gather."""
    owners = assign_owners(dims, world)
    shares = [[d for d, o in zip(dims, owners) if o == r] for r in range(world)]
    triangles = [sum(d * (d + 1) for d in share) for share in shares]
    gathered = max(sum(_payload(d, metrics) for d in share) for share in shares) + 1  # + the lost flag
    out = {"totals": sum(2 * (d + 2) * 8 for d in dims), "reduce_scatter": 0, "reduce": 0, "all_gather": gathered * 8}
    if _uses_reduce_scatter(triangles):
        out["reduce_scatter"] = world * max(triangles) * 8
    else:
        out["reduce"] = sum(triangles) * 8
    return out


def sharded_metric_values(
    pairs: Sequence[tuple[CovarianceAccumulator, CovarianceAccumulator]],
    metrics: str = "all",
    group=None,
    spectra_dtype: str = "float64",
    lost: Optional[str] = None,
) -> tuple[list[dict[str, float]], list[Optional[tuple[Tensor, Tensor]]], list[int]]:
    """What :func:`nerve_hf.spectra.metric_values` returns for the synced pairs, plus each pair's
    global row count, computed with each process decomposing only its share. Collective over ``group``.
    The accumulators keep their own statistics (no synced state is stored on them). ``lost``: why this
    process's statistics are incomplete (then, as after a local failure here, every process raises
    :class:`RowsLostError` once the rows are exchanged)."""
    if not pairs:  # no site of this kind (an MoE model without dense FFNs): every rank skips alike
        return [], [], []
    world, me = distributed.world_size(group), distributed.rank(group)
    accs = [acc for pair in pairs for acc in pair]
    device = common_device(accs)
    totals = reduce_totals(accs, device, group)
    dims = [pre.dim for pre, _ in pairs]
    owners = assign_owners(dims, world)
    mine = [i for i, owner in enumerate(owners) if owner == me]

    shares = [[i for i, owner in enumerate(owners) if owner == r] for r in range(world)]
    sizes = [sum(dims[i] * (dims[i] + 1) for i in share) for share in shares]

    def triangles(share: list[int], length: int) -> Tensor:
        """The upper triangles of ``share``'s pre and post M2 about the global mean, zero-padded."""
        buffer = torch.zeros(length, dtype=torch.float64, device=device)
        offset = 0
        for i in share:
            for side in (0, 1):
                acc, total = accs[2 * i + side], totals[2 * i + side]
                upper = _upper(acc.m2_about(total.means, device))  # [D(D+1)/2]
                buffer[offset : offset + upper.numel()] = upper
                offset += upper.numel()
        return buffer

    def guarded_triangles(share: list[int], length: int) -> Tensor:
        """:func:`triangles`, or zeros of the same length when building them fails here (noted in ``lost``)."""
        nonlocal lost
        if lost is None:
            try:
                return triangles(share, length)
            except Exception as error:  # noqa: BLE001 - the other processes are waiting in the exchange
                lost = f"{type(error).__name__}: {error}"
        return torch.zeros(length, dtype=torch.float64, device=device)

    if _uses_reduce_scatter(sizes):  # chunk r: the triangles of process r's share, padded to the largest
        chunk = max(sizes)
        buffer = torch.cat([guarded_triangles(share, chunk) for share in shares])
        received = distributed.reduce_scatter_sum(buffer, group)  # [K] this process's sums
        del buffer
    else:  # few FFNs, many processes: one reduce to each owner
        received = None
        for r, share in enumerate(shares):
            if share:
                summed = distributed.reduce_sum(guarded_triangles(share, sizes[r]), r, group)
                received = summed if r == me else received

    owned_pairs, offset = [], 0
    for i in mine:
        pair = []
        for side in (0, 1):
            n = totals[2 * i + side].count
            size = dims[i] * (dims[i] + 1) // 2
            pair.append(_Summed(dims[i], _full(received[offset : offset + size], dims[i]), n))
            offset += size
        owned_pairs.append(tuple(pair))
    values, spectra, lost = local_metric_values(owned_pairs, [dims[i] for i in mine], metrics, spectra_dtype, lost)

    counts = [totals[2 * i].count for i in mine]
    return gather_rows(values, spectra, counts, shares, dims, metrics, device, group, lost=lost)


def local_metric_values(pairs, dims: Sequence[int], metrics: str, spectra_dtype: str, lost: Optional[str]):
    """(values, spectra, lost) of this process's own pairs: :func:`metric_values`, or NaN rows of the same
    shape when ``lost`` is set or the computation fails here (``lost`` then says why)."""
    if lost is None:
        try:
            values, spectra = metric_values(pairs, metrics, spectra_dtype)
            return values, spectra, None
        except Exception as error:  # noqa: BLE001 - the other processes are waiting in the exchange
            lost = f"{type(error).__name__}: {error}"
    nan = float("nan")
    values = [dict.fromkeys(METRIC_NAMES, nan) for _ in dims]
    spectra = [(torch.full((d,), nan, dtype=torch.float64), torch.full((d,), nan, dtype=torch.float64)) for d in dims]
    return values, spectra, lost


def gather_rows(
    values: list[dict[str, float]],
    spectra: list[Optional[tuple[Tensor, Tensor]]],
    counts: list[int],
    shares: list[list[int]],
    dims: Sequence[int],
    metrics: str,
    device: torch.device,
    group=None,
    lost: Optional[str] = None,
) -> tuple[list[dict[str, float]], list[Optional[tuple[Tensor, Tensor]]], list[int]]:
    """Every process's rows for every site, from each process's rows of its own share (``shares[r]``:
    the site indices process r computed, in the order of its ``values``). One all-gather, each process's
    rows padded to the largest share's payload (row count, seven metrics, and both spectra for "all"),
    after a flag saying whether the process lost its rows (``lost``: why). If any process did, every
    process raises :class:`RowsLostError` after the all-gather."""
    payload = max(sum(_payload(dims[i], metrics) for i in share) for share in shares) + 1
    packed = torch.full((payload,), float("nan"), dtype=torch.float64)
    packed[0] = 0.0 if lost is None else 1.0
    offset = 1
    for row, eigs, count in zip(values, spectra, counts):
        packed[offset] = float(count)
        packed[offset + 1 : offset + 1 + _N_METRICS] = torch.tensor(
            [row[name] for name in METRIC_NAMES], dtype=torch.float64
        )
        offset += 1 + _N_METRICS
        if metrics != "pr":
            packed[offset : offset + 2 * eigs[0].numel()] = torch.cat(eigs)
            offset += 2 * eigs[0].numel()
    gathered = distributed.all_gather(packed.to(device), group).cpu()  # [W * payload]
    failed = [r for r in range(len(shares)) if gathered[r * payload] != 0]
    if failed:
        here = f" (here: {lost})" if lost is not None else ""
        raise RowsLostError(f"process(es) {failed} of {len(shares)} lost their rows of this measurement{here}")

    n_sites = len(dims)
    all_values: list[dict[str, float]] = [{} for _ in range(n_sites)]
    all_spectra: list[Optional[tuple[Tensor, Tensor]]] = [None] * n_sites
    all_counts = [0] * n_sites
    for r, share in enumerate(shares):
        offset = r * payload + 1
        for i in share:
            all_counts[i] = int(gathered[offset])
            all_values[i] = dict(zip(METRIC_NAMES, gathered[offset + 1 : offset + 1 + _N_METRICS].tolist()))
            offset += 1 + _N_METRICS
            if metrics != "pr":
                d = dims[i]
                all_spectra[i] = (gathered[offset : offset + d].clone(), gathered[offset + d : offset + 2 * d].clone())
                offset += 2 * d
    return all_values, all_spectra, all_counts


class _Summed:
    """A synced covariance held by its owner: what :func:`metric_values` reads of an accumulator."""

    def __init__(self, dim: int, m2: Tensor, count: int) -> None:
        self.dim, self.m2, self.count, self.device = dim, m2, count, m2.device  # m2: [D, D] summed

    def covariance(self) -> Tensor:
        if self.count < 2:
            return torch.full_like(self.m2, float("nan"))
        return self.m2 / (self.count - 1)


def _upper(matrix: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of ``[D, D]``, row by row: ``[D(D+1)/2]``."""
    rows, cols = torch.triu_indices(*matrix.shape, device=matrix.device)
    return matrix[rows, cols]


def _full(upper: Tensor, dim: int) -> Tensor:
    """The symmetric ``[D, D]`` matrix whose upper triangle is ``upper``."""
    rows, cols = torch.triu_indices(dim, dim, device=upper.device)
    matrix = upper.new_empty(dim, dim)
    matrix[rows, cols] = upper
    matrix[cols, rows] = upper
    return matrix
