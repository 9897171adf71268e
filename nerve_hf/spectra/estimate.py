"""The seven NerVE metrics of wide FFNs without a full eigendecomposition (``spectra="estimate"``).

A float64 ``eigvalsh`` of a D×D covariance costs ~(4/3)·D³ flops in a reduction that gains little from
threads. The estimate touches Σ only through products ``Σ @ x`` (a top-k Lanczos by ARPACK) and block
products ``X @ Σ`` (the quadrature), plus O(D²) reductions. Notation: λ₁ ≥ … ≥ λ_D the eigenvalues of Σ,
t = tr Σ, p = λ/t, ρ = Σ/t, k = ``top_k``, m = ``probes``, s = ``lanczos_steps``, f(x) = −x ln x, f(0) = 0.

* **top-k**: λ₁ … λ_k and eigenvectors V [D, k] by :func:`nerve_hf.spectra.slq.top_eigenpairs` (ARPACK's
  ``eigsh``, ``which="LA"``, start vector drawn from ``seed``), exact to ARPACK's tolerance. The *residual mass*
  R = 1 − Σ_{i≤k} p_i and the bulk's square sum Q = Σ_{i>k} p_i² = ‖Σ‖²_F / t² − Σ_{i≤k} p_i² are then
  exact too.
* **PR** = t² / ‖Σ‖²_F: exact, no estimate (the exact path clamps round-off negatives to 0 first; on
  rank-deficient covariances the two differ by ~1e-7 relative).
* **SE** = Σ_{i≤k} f(p_i) + tr f(PρP), P = I − VVᵀ. Deflated, PρP has the bulk eigenvalues p_{k+1..D}
  and k zeros, and f(0) = 0, so its trace is the bulk's entropy. That trace is estimated by stochastic
  Lanczos quadrature (:func:`nerve_hf.spectra.slq.slq_trace`'s construction, on PρP): m Rademacher probes
  (drawn from ``seed``), s Lanczos steps each, nodes θ and weights τ². Round-off nodes below 0 count as
  0. The m probes' estimates are averaged with two control variates: the same quadrature of x and x²
  estimates R and Q, known exactly, and the least-squares fit of the per-probe entropies on those two
  errors is evaluated at zero error (the Hutchinson noise of the entropy is mostly noise in the mass:
  on real FFN covariances this cuts the error ~30x). Stated error: that intercept's least-squares
  standard error, √(σ̂² (XᵀX)⁻¹₀₀) with σ̂² = Σ r²/(m − 3).
* **EEE** = (2/D) Σ_j (C_j − j/D) = (D + 1)/D − (2/D) Σ_i i·p_i needs the bulk's mass rank by rank, and so
  does **JS** (pre and post compared index by index). The *bulk model*: the m·s SLQ nodes and weights
  are a discrete estimate of the spectral measure of PρP with D eigenvalue counts (Lin, Saad & Yang,
  "Approximating spectral densities of large matrices", SIAM Rev. 58(1), 2016). Sorted by value, atom θ
  of count c = D·τ²/m covers c consecutive ranks; the bulk rank k + i takes the θ covering position
  i − ½, for i = 1 … D − k (the last k positions are PρP's deflated zeros). That descending bulk (Ritz
  values lie inside the spectrum, so at most p_{k+1}) is scaled to its exact mass R and appended to the
  exact top-k; ranks that scaling would lift above p_k are held at p_k and the rest scaled further, so
  the spectrum stays sorted. EEE and JS are then the exact formulas (:mod:`nerve_hf.metrics`) on it.
  With m·s atoms over D − k ranks each covers a few ranks, so steps, rank-deficiency cut-offs included,
  stay sharp. Stated error: the delete-one-probe jackknife standard error of the same construction.
* **Bounds** (``bounds``) hold for every bulk of mass R on D − k ranks with at most p_k per rank, so
  whatever the bulk model gets wrong, given the top-k: the bulk's entropy and its rank moment
  Σ_{i>k} i·p_i lie between the front-loaded bulk (⌊R/p_k⌋ ranks at p_k, the remainder on one) and the
  uniform one, which bounds SE and EEE; JS's bulk ranks add between g(R_pre, R_post) (g the JS summand
  of one rank, convex and 1-homogeneous) and ln 2 · (R_pre + R_post)/2. They are tight when R is small
  and loose on real activations, where the top 64 of 8192 directions leave R ≈ 0.55-0.6.

The standard errors cover the probes' randomness, not the bulk model's discretisation: on real FFN
covariances (D = 2048-8192) EEE_post came out ~1-2e-3 low and JS ~3e-4-1e-3 high (1-2.8 standard
errors), SE within 3.2e-3 nats, all inside the bounds.

With ``top_k`` ≥ rank Σ the bulk is empty (R = 0 to round-off) and SE, EEE and JS are exact.

Cost per covariance: top-k ≈ 3k products Σx (memory-bound, O(D²) each); SLQ s block products of Σ with
m vectors (2·s·m·D² flops) and O(s²·m·D) reorthogonalisation; memory (s·m + k)·D float64 besides Σ.
Measured on one CPU thread at D = 8192 (k = 64, m = 16, s = 32): ~7.5 s against ~22.5 s for ``eigvalsh``
(3x; 1.5x at 4096, 0.8x at 2048; benchmarks/perf/spectra_estimate.py); the ratio grows ~linearly with D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from nerve_hf.metrics import METRIC_NAMES, early_enrichment, js_divergence
from nerve_hf.spectra.exact import exact_metric_values
from nerve_hf.spectra.slq import (
    DEFAULT_SEED,
    control_variate_mean,
    gauss_quadrature,
    lanczos,
    rademacher_probes,
    top_eigenpairs,
)

__all__ = [
    "ESTIMATE_MIN_DIM",
    "DEFAULT_TOP_K",
    "DEFAULT_PROBES",
    "DEFAULT_LANCZOS_STEPS",
    "SideEstimate",
    "SpectrumEstimate",
    "estimate_side",
    "estimated_metrics",
    "estimated_metric_values",
]

ESTIMATE_MIN_DIM = 4096  # spectra="estimate": at least this wide, estimated; narrower: decomposed (faster there)
DEFAULT_TOP_K = 64  # leading eigenpairs computed exactly (eigsh) and deflated
DEFAULT_PROBES = 16  # Rademacher probes of the SLQ
DEFAULT_LANCZOS_STEPS = 32  # Lanczos steps (quadrature nodes) per probe: 48 measured no better


def _entropy_terms(x: np.ndarray) -> np.ndarray:
    """f(x) = −x ln x elementwise, with f(x) = 0 for x ≤ 0 (round-off nodes below zero)."""
    x = np.clip(x, 0.0, None)
    return -np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


@dataclass
class SideEstimate:
    """What the estimate knows of one covariance's normalised spectrum p (see the module doc)."""

    dim: int
    top: np.ndarray  # [k] exact leading p_1 ≥ … ≥ p_k
    residual_mass: float  # R = 1 − Σ top, exact
    bulk_square: float  # Q = Σ_{i>k} p_i², exact (from ‖Σ‖_F)
    pr: float  # exact PR = 1 / Σ p²
    nodes: np.ndarray  # [m, s] SLQ nodes θ of PρP (clamped at 0)
    weights: np.ndarray  # [m, s] τ² per probe (each row sums to 1)
    se: float  # estimated SE
    se_stderr: float
    se_bounds: tuple[float, float]
    spectrum: np.ndarray = field(repr=False)  # [D] exact top-k + modelled bulk, sums to 1

    @property
    def probes(self) -> int:
        return self.nodes.shape[0]


@dataclass
class SpectrumEstimate:
    """:func:`estimated_metrics`' result: ``values`` has exactly :data:`nerve_hf.metrics.METRIC_NAMES`."""

    values: dict[str, float]
    stderr: dict[str, float]  # statistical error (over probes) of each value; 0 for exact ones (PR)
    bounds: dict[str, tuple[float, float]]  # interval holding the exact value for any bulk (given top-k)
    pre: Optional[SideEstimate]
    post: Optional[SideEstimate]


def _as_matrix(cov) -> Tensor:
    """``cov`` as a float64 torch matrix on its own device (NumPy arrays: on the CPU, sharing memory)."""
    cov = torch.as_tensor(cov)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(cov.shape)}")
    return cov.detach().to(torch.float64)


def _bulk_spectrum(
    nodes: np.ndarray, weights: np.ndarray, dim: int, k: int, mass: float, cap: float = math.inf
) -> np.ndarray:
    """The bulk model: descending p̂_{k+1..D} [D − k] from the SLQ measure of PρP (see the module doc)."""
    n_bulk = dim - k
    if n_bulk == 0:
        return np.zeros(0)
    theta = np.clip(nodes.ravel(), 0.0, None)
    counts = weights.ravel() * (dim / nodes.shape[0])  # eigenvalue counts of the atoms, D in total
    order = np.argsort(-theta, kind="stable")
    theta, counts = theta[order], counts[order]
    ends = np.cumsum(counts)  # atom j covers the ranks (ends[j-1], ends[j]] from the top
    at = np.searchsorted(ends, np.arange(n_bulk) + 0.5)  # the atom covering each bulk rank's middle
    bulk = theta[np.minimum(at, theta.shape[0] - 1)]  # descending, as theta is
    if not (bulk.sum() > 0 and mass > 0):
        return np.full(n_bulk, max(mass, 0.0) / n_bulk)
    return _scale_under_cap(bulk, mass, cap)


def _scale_under_cap(bulk: np.ndarray, mass: float, cap: float) -> np.ndarray:
    """``bulk`` (descending, ≥ 0) scaled to sum to ``mass`` with no entry above ``cap`` = p_k: the entries
    that would pass the cap are held at it and the rest scaled up further (feasible: mass ≤ (D − k)·cap).
    Scaling and clipping keep the order."""
    bulk = bulk * (mass / bulk.sum())
    for _ in range(bulk.shape[0]):
        bulk = np.minimum(bulk, cap)
        free = bulk < cap
        missing = mass - bulk.sum()
        if missing <= 1e-15 * mass or not free.any() or bulk[free].sum() <= 0:
            break
        bulk[free] *= 1.0 + missing / bulk[free].sum()
    return bulk


def _bulk_entropy_bounds(dim: int, k: int, mass: float, cap: float) -> tuple[float, float]:
    """Least and greatest Σ_{i>k} f(p_i) over descending bulks of mass R on D − k ranks, each ≤ cap = p_k."""
    n_bulk = dim - k
    if mass <= 0 or n_bulk == 0:
        return 0.0, 0.0
    high = -mass * math.log(mass / n_bulk)  # uniform (f concave)
    if cap <= 0:
        return high, high
    full = min(int(mass // cap), n_bulk)
    low = float(full * _entropy_terms(np.array([cap]))[0] + _entropy_terms(np.array([mass - full * cap]))[0])
    return min(low, high), high


def _bulk_rank_moment_bounds(dim: int, k: int, mass: float, cap: float) -> tuple[float, float]:
    """Least and greatest Σ_{i>k} i·p_i over the same bulks (front-loaded at cap; uniform)."""
    n_bulk = dim - k
    if mass <= 0 or n_bulk == 0:
        return 0.0, 0.0
    high = mass * (k + 1 + dim) / 2
    if cap <= 0:
        return high, high
    full = min(int(mass // cap), n_bulk)
    low = cap * (full * k + full * (full + 1) / 2) + (mass - full * cap) * (k + full + 1)
    return min(low, high), high


def estimate_side(
    cov,
    *,
    top_k: int = DEFAULT_TOP_K,
    probes: int = DEFAULT_PROBES,
    lanczos_steps: int = DEFAULT_LANCZOS_STEPS,
    seed: int = DEFAULT_SEED,
) -> Optional[SideEstimate]:
    """Top-k, exact PR, SLQ entropy and the modelled spectrum of one symmetric PSD covariance ``cov``
    (torch or NumPy ``[D, D]``); ``None`` where the spectrum has no distribution (non-finite entries or
    tr Σ ≤ 0), whose metrics are NaN."""
    cov = _as_matrix(cov)
    d = cov.shape[0]
    frobenius = float(torch.linalg.vector_norm(cov))  # ‖Σ‖_F: NaN or Inf iff an entry is (no D² temporary)
    trace = float(cov.diagonal().sum())
    if not (math.isfinite(frobenius) and trace > 0):
        return None
    k = max(0, min(int(top_k), d))
    lam, vec = top_eigenpairs(cov, k, seed)  # [k], [D, k]
    top = lam.clamp_min(0.0).cpu().numpy() / trace  # [k]
    residual = max(0.0, 1.0 - float(top.sum()))
    frob_sq = (frobenius / trace) ** 2  # Σ p² = ‖Σ‖²_F / t²
    bulk_square = max(0.0, frob_sq - float((top**2).sum()))

    def apply(x: Tensor) -> Tensor:  # P ρ P on rows [m, D]
        y = x - (x @ vec) @ vec.T
        z = (y @ cov) / trace  # Σ symmetric: (Σ yᵀ)ᵀ
        return z - (z @ vec) @ vec.T

    if k < d:
        start = rademacher_probes(d, probes, seed + 1).to(cov.device)
        nodes, weights = gauss_quadrature(*lanczos(apply, start, lanczos_steps))
        nodes = np.clip(nodes, 0.0, None)
    else:
        nodes, weights = np.zeros((probes, 1)), np.ones((probes, 1))
    # per-probe quadratures of f, of x (-> R) and of x² (-> Q): control variates with known means
    entropy = d * (weights * _entropy_terms(nodes)).sum(axis=1)  # [m]
    mass_error = d * (weights * nodes).sum(axis=1) - residual  # [m]
    square_error = d * (weights * nodes**2).sum(axis=1) - bulk_square  # [m]
    controls = np.stack([mass_error, square_error], axis=1)  # [m, 2]
    bulk_entropy, stderr = control_variate_mean(entropy, controls)
    low, high = _bulk_entropy_bounds(d, k, residual, float(top[-1]) if k else 1.0)
    top_entropy = float(_entropy_terms(top).sum())
    bulk = _bulk_spectrum(nodes, weights, d, k, residual, float(top[-1]) if k else math.inf)
    return SideEstimate(
        dim=d,
        top=top,
        residual_mass=residual,
        bulk_square=bulk_square,
        pr=1.0 / frob_sq,
        nodes=nodes,
        weights=weights,
        se=top_entropy + float(np.clip(bulk_entropy, low, high)),
        se_stderr=stderr,
        se_bounds=(top_entropy + low, top_entropy + high),
        spectrum=np.concatenate([top, bulk]),
    )


def _side_spectrum(side: SideEstimate, drop: Optional[int] = None) -> np.ndarray:
    """The modelled spectrum [D] of ``side``, from all probes or all but probe ``drop``."""
    if drop is None:
        return side.spectrum
    keep = np.arange(side.probes) != drop
    k = side.top.shape[0]
    cap = float(side.top[-1]) if k else math.inf
    bulk = _bulk_spectrum(side.nodes[keep], side.weights[keep], side.dim, k, side.residual_mass, cap)
    return np.concatenate([side.top, bulk])


def _eee(p: np.ndarray) -> float:
    return float(early_enrichment(torch.from_numpy(p)))


def _js(p: np.ndarray, q: np.ndarray) -> float:
    return float(js_divergence(torch.from_numpy(p), torch.from_numpy(q)))


def _jackknife(values: np.ndarray) -> float:
    """Delete-one jackknife standard error from the m leave-one-out values."""
    m = values.shape[0]
    if m < 2:
        return math.nan
    return float(math.sqrt((m - 1) / m * ((values - values.mean()) ** 2).sum()))


def _js_summand(a: float, b: float) -> float:
    """g(a, b) = ½[a ln(2a/(a+b)) + b ln(2b/(a+b))]: JS's term for one rank (0 ln 0 = 0)."""
    total = a + b
    if total <= 0:
        return 0.0
    return 0.5 * sum(x * math.log(2 * x / total) for x in (a, b) if x > 0)


def _eee_bounds(side: SideEstimate) -> tuple[float, float]:
    d, k = side.dim, side.top.shape[0]
    ranks = np.arange(1, k + 1)
    head = float((ranks * side.top).sum())
    low, high = _bulk_rank_moment_bounds(d, k, side.residual_mass, float(side.top[-1]) if k else 1.0)
    # EEE = (D+1)/D − (2/D) Σ i p_i: decreasing in the rank moment
    return (d + 1) / d - 2 / d * (head + high), (d + 1) / d - 2 / d * (head + low)


def _js_bounds(pre: SideEstimate, post: SideEstimate) -> tuple[float, float]:
    k = min(pre.top.shape[0], post.top.shape[0])
    p, q = pre.spectrum, post.spectrum
    head = sum(_js_summand(float(a), float(b)) for a, b in zip(p[:k], q[:k]))
    r_pre, r_post = float(p[k:].sum()), float(q[k:].sum())
    return head + _js_summand(r_pre, r_post), head + math.log(2) * (r_pre + r_post) / 2


def estimated_metrics(
    cov_pre,
    cov_post,
    *,
    top_k: int = DEFAULT_TOP_K,
    probes: int = DEFAULT_PROBES,
    lanczos_steps: int = DEFAULT_LANCZOS_STEPS,
    seed: int = DEFAULT_SEED,
) -> SpectrumEstimate:
    """SE, PR, EEE of the pre and post covariances (symmetric PSD ``[D, D]``, torch or NumPy; computed in
    float64 on the CPU) and JS between them, without a full eigendecomposition (the module doc gives each
    formula). ``values`` holds exactly :data:`nerve_hf.metrics.METRIC_NAMES`, so it can stand for the exact
    row; a side without a distribution (non-finite or zero variance) has NaN metrics, and JS is NaN then.
    The same ``seed`` gives the same numbers.

    >>> lam = np.array([5.0, 3.0, 1.0, 1.0, 0.5, 0.5, 0.0])  # rank 6 ≤ top_k: all exact
    >>> est = estimated_metrics(np.diag(lam), np.diag(lam[::-1]), top_k=6, probes=4, lanczos_steps=7)
    >>> from nerve_hf.metrics import spectrum_metrics
    >>> exact = spectrum_metrics(torch.from_numpy(lam), torch.from_numpy(lam))
    >>> all(abs(est.values[k] - float(exact[k])) < 1e-12 for k in exact)
    True
    """
    options = dict(top_k=top_k, probes=probes, lanczos_steps=lanczos_steps, seed=seed)
    pre, post = estimate_side(cov_pre, **options), estimate_side(cov_post, **options)
    values = dict.fromkeys(METRIC_NAMES, math.nan)
    stderr = dict.fromkeys(METRIC_NAMES, math.nan)
    bounds = dict.fromkeys(METRIC_NAMES, (math.nan, math.nan))
    for name, side in (("pre", pre), ("post", post)):
        if side is None:
            continue
        values[f"se_{name}"], stderr[f"se_{name}"], bounds[f"se_{name}"] = side.se, side.se_stderr, side.se_bounds
        values[f"pr_{name}"], stderr[f"pr_{name}"], bounds[f"pr_{name}"] = side.pr, 0.0, (side.pr, side.pr)
        values[f"eee_{name}"] = _eee(side.spectrum)
        stderr[f"eee_{name}"] = _jackknife(np.array([_eee(_side_spectrum(side, drop)) for drop in range(side.probes)]))
        bounds[f"eee_{name}"] = _eee_bounds(side)
    if pre is not None and post is not None:
        if pre.dim != post.dim:
            raise ValueError(f"pre and post covariances must have the same width, got {pre.dim} and {post.dim}")
        values["js"] = _js(pre.spectrum, post.spectrum)
        leave_one_out = [
            _js(_side_spectrum(pre, drop), _side_spectrum(post, drop)) for drop in range(min(pre.probes, post.probes))
        ]
        stderr["js"] = _jackknife(np.array(leave_one_out))
        bounds["js"] = _js_bounds(pre, post)
    return SpectrumEstimate(values=values, stderr=stderr, bounds=bounds, pre=pre, post=post)


def estimated_metric_values(
    pairs: Sequence[tuple],
    *,
    min_dim: int = ESTIMATE_MIN_DIM,
    top_k: int = DEFAULT_TOP_K,
    probes: int = DEFAULT_PROBES,
    lanczos_steps: int = DEFAULT_LANCZOS_STEPS,
    seed: int = DEFAULT_SEED,
    spectra_dtype: str = "float64",
) -> tuple[list[dict[str, float]], list[Optional[tuple[Tensor, Tensor]]]]:
    """Drop-in for ``nerve_hf.spectra.metric_values(pairs, "all", spectra_dtype)`` on (pre, post)
    accumulator pairs (anything with ``.dim`` and ``.covariance()``): pairs narrower than ``min_dim`` are
    decomposed exactly by it, the others estimated by :func:`estimated_metrics`. Returns the metric rows
    and each pair's spectra, descending float64 CPU ``[D]``; an estimated pair's spectra are the exact
    top-k followed by the modelled bulk (all NaN where a side has no distribution)."""

    narrow = [i for i, (pre, _) in enumerate(pairs) if pre.dim < min_dim]
    values: list[dict[str, float]] = [{} for _ in pairs]
    kept: list[Optional[tuple[Tensor, Tensor]]] = [None] * len(pairs)
    if narrow:
        exact_values, exact_spectra = exact_metric_values([pairs[i] for i in narrow], "all", spectra_dtype)
        for i, row, pair in zip(narrow, exact_values, exact_spectra):
            values[i], kept[i] = row, pair
    options = dict(top_k=top_k, probes=probes, lanczos_steps=lanczos_steps, seed=seed)
    for i, (pre, post) in enumerate(pairs):
        if pre.dim < min_dim:
            continue
        estimate = estimated_metrics(pre.covariance(), post.covariance(), **options)
        values[i] = dict(estimate.values)
        kept[i] = tuple(
            torch.from_numpy(side.spectrum.copy())
            if side is not None
            else torch.full((acc.dim,), math.nan, dtype=torch.float64)
            for side, acc in ((estimate.pre, pre), (estimate.post, post))
        )
    return values, kept
