"""Covariances -> eigenvalues -> metric rows, by exact eigendecomposition (or PR by the trace).

Used by :class:`nerve_hf.FFNTracker` (and through it the Trainer callback and the probe) and by
:meth:`nerve_hf.CovarianceAccumulator.eigenvalues`. What lives here:

* :func:`eigenvalues_batched`: float64 ``eigvalsh`` of many symmetric matrices, batched per shape; on the
  CPU the batch is spread over threads, one share of the matrices each (LAPACK runs without the GIL, and
  the tridiagonal reduction of one matrix gains little from extra threads).
* :func:`eigen_batches`: consecutive runs of accumulators whose matrices fit a memory bound, so that the
  transient copies of a decomposition (covariances, their stack, the finite subset, LAPACK's working
  copy: about 4x a batch) never grow with the number of FFNs.
* :func:`participation_ratio_from_covariance`: PR by the trace identity, no eigendecomposition.
* :func:`metric_values`: the seven metrics of (pre, post) accumulator pairs, one batched metrics call per
  width, or PR only; :func:`nan_values` / :func:`nan_rows` for measurements that have no values.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor

from nerve_hf.metrics import METRIC_NAMES, spectrum_metrics

__all__ = [
    "all_finite",
    "EIGEN_BATCH_BYTES",
    "METRIC_SETS",
    "eigenvalues_batched",
    "eigen_batches",
    "participation_ratio_from_covariance",
    "spectra_of",
    "SPECTRA_DTYPES",
    "SPECTRA_METHODS",
    "exact_metric_values",
    "nan_values",
    "nan_rows",
]

EIGEN_BATCH_BYTES = 1 << 30  # decompose at most this much float64 covariance at once (or one matrix)
# "all": every metric by eigendecomposition; "pr": PR only, by the trace; "estimate": every metric, FFNs at least
# nerve_hf.spectra.estimate.ESTIMATE_MIN_DIM wide estimated from products with Σ instead of an eigendecomposition
METRIC_SETS = ("all", "pr", "estimate")
SPECTRA_METHODS = ("exact", "estimate")  # how the spectra behind "all" are obtained (metric_set maps them)
SPECTRA_DTYPES = ("float64", "float32")  # eigendecomposition precision; float32's error: docs/scaling.md


class HasCovariance(Protocol):
    """What the functions here need of an accumulator."""

    dim: int

    def covariance(self) -> Tensor: ...


def eigenvalues_batched(covariances: Sequence[Tensor], keep_dtype: bool = False) -> list[Tensor]:
    """Descending float64 eigenvalues of symmetric matrices, one batched ``eigvalsh`` per shape
    (``keep_dtype``: in each matrix's own dtype).

    Matrices of equal size on the same device are stacked into ``[L, D, D]`` and decomposed together;
    a matrix holding NaN/Inf (e.g. fewer than two rows seen) gets an all-NaN spectrum.

    >>> [e.tolist() for e in eigenvalues_batched([torch.diag(torch.tensor([1.0, 3.0])), torch.eye(1)])]
    [[3.0, 1.0], [1.0]]
    """
    results: list[Optional[Tensor]] = [None] * len(covariances)
    groups: dict[tuple, list[int]] = {}
    for index, cov in enumerate(covariances):
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"expected square matrices, got shape {tuple(cov.shape)}")
        groups.setdefault((cov.shape[0], cov.device), []).append(index)
    for (dim, device), indices in groups.items():
        stack = torch.stack([covariances[i] if keep_dtype else covariances[i].to(torch.float64) for i in indices])
        finite = all_finite(stack)  # [L]
        spectra = torch.full((len(indices), dim), float("nan"), dtype=stack.dtype, device=device)
        if bool(finite.any()):
            ascending = _eigvalsh(stack[finite])  # [L', D]
            spectra[finite] = ascending.flip(-1)
        for position, index in enumerate(indices):
            results[index] = spectra[position]
    return results  # type: ignore[return-value]


def all_finite(matrices: Tensor) -> Tensor:
    """Whether every entry of each matrix is finite, from its smallest and largest entry alone: a NaN
    propagates into both, an infinity is one of them.  [..., D, D] -> [...] bool

    One reduction pass and no ``[..., D, D]`` boolean temporary (``isfinite(Σ).all()`` builds one: at
    D = 1024 it took as long as forming the covariance; ``measurement_breakdown.py``).

    >>> m = torch.eye(3, dtype=torch.float64)
    >>> stack = torch.stack([m, m.clone().fill_diagonal_(float("nan")), m.clone().fill_diagonal_(float("-inf"))])
    >>> all_finite(stack).tolist(), bool(all_finite(m))
    ([True, False, False], True)
    """
    if matrices.ndim == 2:  # one matrix: the whole-tensor reduction (on the CPU ~8x faster than along a dim)
        low, high = torch.aminmax(matrices)
    else:
        low, high = torch.aminmax(matrices.flatten(-2), dim=-1)  # [...] each
    return torch.isfinite(low) & torch.isfinite(high)


def _eigvalsh(stack: Tensor) -> Tensor:
    """``torch.linalg.eigvalsh`` of ``[L, D, D]``, on the CPU in shares of the batch (:func:`_on_cpu_threads`),
    on CUDA one matrix per stream (:func:`_on_cuda_streams`)."""
    if stack.device.type == "cuda" and stack.shape[0] > 1 and stack.shape[-1] >= CUDA_STREAMS_MIN_DIM:
        return _on_cuda_streams(torch.linalg.eigvalsh, stack)
    if stack.device.type != "cpu":
        return torch.linalg.eigvalsh(stack)
    shares = stack.tensor_split(min(torch.get_num_threads(), stack.shape[0]))
    return torch.cat(_on_cpu_threads(torch.linalg.eigvalsh, shares))


def _on_cpu_threads(function, items: Sequence) -> list:
    """``[function(item) for item in items]``, spread over the CPU's torch threads.

    torch's CPU eigvalsh decomposes a batch one matrix after the other, each with all torch threads,
    and the tridiagonal reduction gains little from threads. So with t threads, min(t, len(items))
    Python threads (LAPACK runs without the GIL) each take items in turn with t // workers torch threads
    (benchmarks/perf/eigendecomposition.py measures both). The thread count is restored afterwards, also
    on error; with one worker the items run here, with all threads.
    """
    threads = torch.get_num_threads()
    workers = min(threads, len(items))
    if workers < 2:
        return [function(item) for item in items]
    per_worker = threads // workers

    def run(item):
        torch.set_num_threads(per_worker)  # this thread's LAPACK/OpenMP width
        return function(item)

    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="nerve-eigvalsh") as pool:
            return list(pool.map(run, items))
    finally:
        torch.set_num_threads(threads)


CUDA_STREAMS_MIN_DIM = 256  # below this cuSOLVER's batched Jacobi solver is used in one launch anyway
CUDA_STREAMS = 8  # side streams (and host threads) for the decompositions of one batch


def _on_cuda_streams(function, stack: Tensor) -> Tensor:
    """``function`` of each matrix of ``stack`` ``[L, D, D]`` on CUDA side streams, each fed by its own
    host thread.  -> [L, D]

    cuSOLVER decomposes a batch one matrix after the other, a symmetric eigensolve of D in the
    thousands is latency-bound (its tridiagonal reduction keeps the GPU far from busy), and each call
    waits on the host for its status word. So up to :data:`CUDA_STREAMS` threads, each with a stream
    of its own, take the matrices in turn, and their solves overlap. The streams start after the work
    queued so far and the caller's stream waits for all of them before the results are used.
    """
    caller = torch.cuda.current_stream(stack.device)
    streams = [torch.cuda.Stream(stack.device) for _ in range(min(CUDA_STREAMS, stack.shape[0]))]
    for stream in streams:
        stream.wait_stream(caller)

    def run(index: int) -> Tensor:
        stream = streams[index % len(streams)]
        with torch.cuda.stream(stream):
            values = function(stack[index])  # [D]
        values.record_stream(caller)  # the caller reads it after the streams' work
        return values

    with ThreadPoolExecutor(len(streams), thread_name_prefix="nerve-eigvalsh-cuda") as pool:
        spectra = list(pool.map(run, range(stack.shape[0])))
    for stream in streams:
        caller.wait_stream(stream)
    return torch.stack(spectra)


def participation_ratio_from_covariance(covariance: Tensor) -> Tensor:
    """PR = tr(Σ)² / ‖Σ‖_F², without an eigendecomposition.  [..., D, D] -> [...]

    Equal to :func:`nerve_hf.metrics.participation_ratio` of Σ's eigenvalues for symmetric Σ;
    NaN when tr(Σ) = 0.

    >>> participation_ratio_from_covariance(torch.eye(3)).item()
    3.0
    """
    covariance = covariance.to(torch.float64)
    trace = covariance.diagonal(dim1=-2, dim2=-1).sum(-1)
    frobenius_sq = covariance.square().sum(dim=(-2, -1))
    ratio = trace.square() / frobenius_sq
    return ratio.masked_fill(~(trace > 0), float("nan"))


def eigen_batches(accs: Sequence[HasCovariance], max_bytes: Optional[int] = None) -> Iterator[list[HasCovariance]]:
    """Consecutive runs of ``accs`` whose D×D float64 matrices total at most ``max_bytes`` (default
    :data:`EIGEN_BATCH_BYTES`); a matrix larger than that is a run of its own."""
    limit = EIGEN_BATCH_BYTES if max_bytes is None else max_bytes
    batch: list[HasCovariance] = []
    size = 0
    for acc in accs:
        nbytes = acc.dim * acc.dim * 8
        if batch and size + nbytes > limit:
            yield batch
            batch, size = [], 0
        batch.append(acc)
        size += nbytes
    if batch:
        yield batch


def nan_values() -> dict[str, float]:
    """Every metric NaN: a measurement without values."""
    return dict.fromkeys(METRIC_NAMES, float("nan"))


def nan_rows(sites: Iterable) -> list[dict]:
    """Report rows (``site, layer, dim, tokens``, ``stack`` for a site of a model with several stacks, and
    NaN metrics) for sites measured without a result."""
    return [{"site": s.site, "layer": s.layer, "dim": 0, "tokens": 0, **_stack(s), **nan_values()} for s in sites]


def _stack(site) -> dict:
    """``{"stack": ...}`` for a site of a model with several stacks, else ``{}``."""
    stack = getattr(site, "stack", "")
    return {"stack": stack} if stack else {}


def spectra_of(accs: Sequence[HasCovariance], dtype: str = "float64") -> list[Tensor]:
    """Descending eigenvalues (float64 CPU tensors ``[D]``) of each accumulator's covariance.

    On the CPU the worker threads of :func:`_on_cpu_threads` each take one accumulator at a time: build
    its covariance, decompose it (in ``dtype``), keep only the eigenvalues. So the transient memory is
    one covariance and one LAPACK workspace per worker, never a stack of matrices. On accelerators the
    covariances go in memory-bounded batches (:func:`eigen_batches`). A covariance holding NaN/Inf gets
    an all-NaN spectrum.
    """
    if dtype not in SPECTRA_DTYPES:
        raise ValueError(f"spectra_dtype must be one of {SPECTRA_DTYPES}, got {dtype!r}")
    work = getattr(torch, dtype)
    if not accs:
        return []
    device = getattr(accs[0], "device", None)
    if device is not None and torch.device(device).type != "cpu":
        out: list[Tensor] = []
        for batch in eigen_batches(accs):
            covs = [acc.covariance().to(work) for acc in batch]
            out.extend(eig.to(torch.float64).cpu() for eig in eigenvalues_batched(covs, keep_dtype=True))
        return out

    def decompose(acc: HasCovariance) -> Tensor:
        cov = acc.covariance().to(work)  # [D, D], the only matrix this worker holds
        if not bool(all_finite(cov)):
            return torch.full((acc.dim,), float("nan"), dtype=torch.float64)
        return torch.linalg.eigvalsh(cov).flip(-1).to(torch.float64)

    return _on_cpu_threads(decompose, accs)


def exact_metric_values(
    pairs: Sequence[tuple[HasCovariance, HasCovariance]], metrics: str = "all", spectra_dtype: str = "float64"
) -> tuple[list[dict[str, float]], list[Optional[tuple[Tensor, Tensor]]]]:
    """The metrics of each (pre, post) pair of accumulators, and their spectra.

    ``metrics="all"``: every covariance eigendecomposed (:func:`spectra_of`, in ``spectra_dtype``), one
    batched :func:`nerve_hf.metrics.spectrum_metrics` call per width; spectra are descending float64 CPU
    tensors. ``metrics="pr"``: ``pr_pre``/``pr_post`` by the trace identity, every other metric NaN,
    no spectra (``None``).
    """
    if metrics not in ("all", "pr"):
        raise ValueError(f"metrics must be 'all' or 'pr', got {metrics!r}")
    if metrics == "pr":
        values = []
        for pre, post in pairs:
            row = nan_values()
            row["pr_pre"] = float(participation_ratio_from_covariance(pre.covariance()))
            row["pr_post"] = float(participation_ratio_from_covariance(post.covariance()))
            values.append(row)
        return values, [None] * len(pairs)

    spectra = spectra_of([acc for pair in pairs for acc in pair], spectra_dtype)  # [D] each, CPU float64
    pre_eigs, post_eigs = spectra[0::2], spectra[1::2]

    by_dim: dict[int, list[int]] = {}
    for i, (pre, _) in enumerate(pairs):
        by_dim.setdefault(pre.dim, []).append(i)
    values: list[dict[str, float]] = [{} for _ in pairs]
    kept: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(pairs)
    for indices in by_dim.values():
        pre = torch.stack([pre_eigs[i] for i in indices])  # [S, D]
        post = torch.stack([post_eigs[i] for i in indices])  # [S, D]
        batched = {name: value.tolist() for name, value in spectrum_metrics(pre, post).items()}  # name -> [S]
        for j, i in enumerate(indices):
            values[i] = {name: float(batched[name][j]) for name in METRIC_NAMES}
            kept[i] = (pre[j], post[j])
    return values, kept
