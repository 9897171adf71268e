"""Batch scatter kernels of :class:`nerve_hf.stats.covariance.CovarianceAccumulator`: centring, the chunked
(block-triangular on the CPU) product, and the float64 merge of a scatter into the running moments.

These are the numerics of :mod:`nerve_hf.stats.covariance`'s module docstring; nothing here keeps state.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["exact_fp32_matmul", "shifted_moments", "add_scatter_and_low_rank", "split_gram", "split_parts"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_CPU_CHUNK_ELEMENTS = 1 << 21  # CPU: centre and multiply this many elements at a time (8 MB of fp32)
_ACCELERATOR_CHUNK_ELEMENTS = 1 << 26  # GPU: ... at most this many (256 MB of fp32 centred rows)
_MIN_CHUNK_ROWS = 256  # ... but never fewer rows than this (the GEMM needs depth to run at full speed)
_CPU_GRAM_BLOCK = 128  # CPU: the scatter's upper triangle is formed in column blocks about this wide ...
_CPU_GRAM_MAX_BLOCKS = 16  # ... and at most this many of them


@contextmanager
def exact_fp32_matmul(device: torch.device) -> Iterator[None]:
    """Keep TF32 away from fp32 matrix products on CUDA for the duration of the block."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        previous, matmul.fp32_precision = matmul.fp32_precision, "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:
        previous, matmul.allow_tf32 = matmul.allow_tf32, False
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def _chunk_rows(rows: Tensor) -> int:
    """Rows centred and multiplied at a time: up to 256 MB of them on accelerators (their caching
    allocators reuse memory), a few MB on the CPU, where a fresh batch-sized buffer costs a page
    fault per 4 KB."""
    dim = rows.shape[1]
    limit = _CPU_CHUNK_ELEMENTS if rows.device.type == "cpu" else _ACCELERATOR_CHUNK_ELEMENTS
    return max(_MIN_CHUNK_ROWS, limit // dim)


def shifted_moments(
    rows: Tensor, weights: Optional[Tensor] = None, count: Optional[Tensor] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(s, Σ(x − s), Σ(x − s)(x − s)ᵀ) for s the batch mean rounded to working precision.

    ``rows`` is ``[N, D]`` with N ≥ 1; the working precision is fp32 for halves, else the rows'
    dtype, so x − s is small and exact where x is close to s. Returns s ``[D]`` (working precision),
    the float64 remainder sum ``[D]`` and the scatter ``[D, D]`` (fp32 or fp64). NaN/Inf anywhere in
    ``rows`` make the remainder sum non-finite.

    With ``weights`` (bool ``[N]``) and ``count`` (their sum, a float64 scalar tensor), only the rows
    weighted True count and the others, NaN/Inf included, contribute exactly zero: the sync-free path,
    whose shapes never depend on the data. Half rows on :data:`SPLIT_PRODUCT_DEVICE_TYPES` are
    multiplied by :func:`split_gram` (tensor cores) instead of an IEEE fp32 GEMM.
    """
    n = rows.shape[0]
    work = torch.float32 if rows.dtype in _HALF_DTYPES else rows.dtype
    on_cpu = rows.device.type == "cpu"
    split = rows.dtype in _HALF_DTYPES and rows.device.type in SPLIT_PRODUCT_DEVICE_TYPES
    step = _chunk_rows(rows)
    chunks = [rows[start : start + step] for start in range(0, n, step)]  # views, [R, D] each
    kept = (
        [None] * len(chunks)
        if weights is None
        else [weights[start : start + step, None] for start in range(0, n, step)]
    )
    # Several CPU chunks: one reused buffer, not a fresh allocation (page faults) per chunk.
    buffer = torch.empty(step, rows.shape[1], dtype=work, device=rows.device) if on_cpu and len(chunks) > 1 else None
    if weights is not None:  # masked-out rows (NaN/Inf included) replaced by 0 before summing
        column_sum = sum(
            torch.where(keep, chunk, 0).sum(dim=0, dtype=work).to(torch.float64) for chunk, keep in zip(chunks, kept)
        )
        shift = (column_sum / count.clamp(min=1)).to(work)  # [D]
    elif rows.dtype == work or not on_cpu:  # torch's fp32 sums are cascaded: error ~ log N
        shift = (rows.sum(dim=0, dtype=work).to(torch.float64) / n).to(work)  # [D]
    else:  # CPU halves: converting chunk by chunk beats one casting reduction
        shift = (sum(_converted(chunk, buffer, work).sum(dim=0).to(torch.float64) for chunk in chunks) / n).to(work)
    remainder_sum = torch.zeros(rows.shape[1], dtype=torch.float64, device=rows.device)  # [D]
    scatter = torch.empty(rows.shape[1], rows.shape[1], dtype=work, device=rows.device)  # [D, D] in `work`
    edges = [0, rows.shape[1]] if split else _gram_block_edges(rows.shape[1], rows.device)
    with exact_fp32_matmul(rows.device):  # every chunk's product in IEEE fp32
        for index, (chunk, keep) in enumerate(zip(chunks, kept)):
            if chunk.dtype == work or not on_cpu:  # accelerator halves: converted inside the subtraction
                centred = (
                    torch.sub(chunk, shift) if buffer is None else torch.sub(chunk, shift, out=buffer[: len(chunk)])
                )
            else:  # CPU halves: convert, then subtract in place (a mixed-dtype subtraction is not vectorised)
                centred = _converted(chunk, buffer, work).sub_(shift)
            if keep is not None:
                centred.masked_fill_(~keep, 0)  # centred: [R, D] in `work`, zero rows where not kept
            remainder_sum += centred.sum(dim=0)
            if split:
                split_gram(centred, out=scatter, accumulate=index > 0)
            else:
                _add_upper_gram(scatter, centred, edges, first=index == 0)
    _mirror_upper(scatter, edges)
    return shift, remainder_sum, scatter


#: Device types whose half-precision rows are multiplied by :func:`split_gram` on tensor cores.
SPLIT_PRODUCT_DEVICE_TYPES: tuple[str, ...] = ("cuda",)


def split_parts(centred: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Three bf16 tensors h, m, l with h + m + l = ``centred`` (fp32 ``[R, D]``) to within 2⁻²⁴ of each value.

    h is the value rounded to bf16 (8 significant bits), m the rounded remainder, l the rounded
    remainder of that; each remainder is exact in fp32, so the residual is bf16's unit round-off 2⁻⁸
    cubed, fp32's own. bf16 keeps fp32's exponent range, so nothing overflows or underflows sooner.
    """
    high = centred.to(torch.bfloat16)
    rest = centred - high.to(torch.float32)  # exact
    middle = rest.to(torch.bfloat16)
    low = (rest - middle.to(torch.float32)).to(torch.bfloat16)
    return high, middle, low


def split_gram(centred: Tensor, out: Tensor, accumulate: bool) -> Tensor:
    """``out`` (+)= ``centredᵀ centred`` (fp32 ``[D, D]`` from fp32 ``[R, D]``) from bf16 products.

    With c = h + m + l (:func:`split_parts`), cᵀc = hᵀh + (hᵀm + mᵀh) + (mᵀm + hᵀl + lᵀh) + O(2⁻²⁴):
    four bf16 GEMMs (hᵀh, hᵀm, mᵀm, hᵀl; the transposed pairs by symmetry), each with fp32
    accumulation and output on CUDA tensor cores, smallest terms summed first. Products of two bf16
    values are exact in fp32, so elsewhere the same parts multiplied by IEEE fp32 GEMMs give the same
    numbers up to the order of summation; tests use that to check the split on the CPU.
    """
    high, middle, low = split_parts(centred)
    cross = _bf16_gram(high, low) + _bf16_gram(high, middle)  # [D, D] fp32
    total = _bf16_gram(middle, middle).add_(cross).add_(cross.T).add_(_bf16_gram(high, high))
    return out.add_(total) if accumulate else out.copy_(total)


def _bf16_gram(a: Tensor, b: Tensor) -> Tensor:
    """aᵀb in fp32 from bf16 ``[R, D]`` operands: tensor cores on CUDA, exact products elsewhere."""
    if a.device.type == "cuda":
        return torch.mm(a.T, b, out_dtype=torch.float32)
    return torch.mm(a.T.to(torch.float32), b.to(torch.float32))


def _gram_block_edges(dim: int, device: torch.device) -> list[int]:
    """Column edges of the blocks in which a scatter ``[D, D]`` is formed.

    The scatter is symmetric, so only its upper block triangle needs computing: with b blocks that
    is (1 + 1/b)/2 of the full product's FLOPs. On the CPU the blocks are ~128 columns wide (at most
    16), wide enough for BLAS to run at full speed; on accelerators, where small GEMMs run below the
    hardware's speed and each costs a launch, the product stays one GEMM.
    """
    count = 1
    if device.type == "cpu":
        count = min(_CPU_GRAM_MAX_BLOCKS, max(1, dim // _CPU_GRAM_BLOCK))
    return [dim * i // count for i in range(count + 1)]


def _add_upper_gram(scatter: Tensor, centred: Tensor, edges: list[int], first: bool) -> None:
    """``scatter``'s upper block triangle (+)= that of ``centredᵀ centred``; ``first`` overwrites.

    ``scatter`` ``[D, D]``, ``centred`` ``[R, D]``; block row i is one GEMM ``centred[:, i]ᵀ centred[:, i:]``,
    written in place (BLAS takes the row stride), so nothing is allocated.
    """
    for low, high in zip(edges, edges[1:]):
        # beta=0 ignores the uninitialised values of `scatter` (NaN included) on the first chunk
        scatter[low:high, low:].addmm_(centred[:, low:high].T, centred[:, low:], beta=0 if first else 1)


def _mirror_upper(scatter: Tensor, edges: list[int]) -> None:
    """Fill the blocks of ``scatter`` ``[D, D]`` below its diagonal blocks from those above them."""
    for low, high in zip(edges[1:-1], edges[2:]):  # rows [low, high) left of their diagonal block
        scatter[low:high, :low] = scatter[:low, low:high].T  # = (columns [low, high) above it)ᵀ


def _converted(chunk: Tensor, buffer: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """``chunk`` converted to ``dtype``: into ``buffer`` when there is one, else a new tensor."""
    return chunk.to(dtype) if buffer is None else buffer[: len(chunk)].copy_(chunk)


def add_scatter_and_low_rank(m2: Tensor, scatter: Tensor, left: Tensor, right: Tensor) -> None:
    """``m2 += scatter + left @ right`` (float64 ``m2``; ``scatter`` of any float dtype), one pass.

    On the CPU this runs in row blocks of a few MB: a mixed-dtype in-place add is not vectorised
    there, and converting all of ``scatter`` at once makes a ``[D, D]`` float64 temporary whose
    fresh pages cost more than the arithmetic.
    """
    dim = m2.shape[0]
    step = dim if m2.device.type != "cpu" else max(1, _CPU_CHUNK_ELEMENTS // dim)
    for start in range(0, dim, step):
        rows = slice(start, start + step)
        m2[rows].add_(scatter[rows].to(m2.dtype)).addmm_(left[rows], right)
