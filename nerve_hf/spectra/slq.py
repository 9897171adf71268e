"""Stochastic Lanczos quadrature (SLQ) and the Lanczos machinery behind :mod:`nerve_hf.spectra.estimate`.

A symmetric operator A [D, D] is touched only through products: ``apply`` maps rows [m, D] to [m, D] (one
block product per Lanczos step). All in float64; every random draw comes from a ``seed``, so results repeat.

* :func:`top_eigenpairs`: the leading k eigenpairs by ARPACK (:func:`scipy.sparse.linalg.eigsh`,
  ``which="LA"``, start vector drawn from ``seed``), exact to ARPACK's tolerance.
* :func:`slq_trace`: tr f(A) by *stochastic Lanczos quadrature* (Ubaru, Chen & Saad, "Fast estimation of
  tr(f(A)) via stochastic Lanczos quadrature", SIAM J. Matrix Anal. Appl. 38(4), 2017): for a Rademacher
  probe v (‖v‖² = D, :func:`rademacher_probes`), s Lanczos steps (:func:`lanczos`) on A from v/√D give
  T = U diag(θ) Uᵀ and vᵀf(A)v ≈ D Σ_j τ_j² f(θ_j), τ_j = U_{1j} (s-point Gauss quadrature,
  :func:`gauss_quadrature`; exact for polynomials of degree ≤ 2s − 1). One probe's Rademacher variance is
  2(‖f(A)‖²_F − Σ_i f(A)_ii²): zero for a diagonal A, where SLQ is exact once s reaches the number of
  distinct eigenvalues.
* :func:`control_variate_mean`: the probes' mean corrected by control variates of known mean (the
  least-squares intercept), and its standard error.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor

__all__ = [
    "DEFAULT_SEED",
    "top_eigenpairs",
    "rademacher_probes",
    "lanczos",
    "gauss_quadrature",
    "slq_trace",
    "control_variate_mean",
]

DEFAULT_SEED = 0  # probes and ARPACK's start vector are drawn from this seed: results repeat


def top_eigenpairs(cov: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """Leading k eigenvalues (descending, [k]) and eigenvectors ([D, k]) of symmetric ``cov`` [D, D], by
    ARPACK (``eigsh``) on products with ``cov`` in torch; densely (exact) when k ≥ D − 1."""
    d = cov.shape[0]
    if k == 0:
        return cov.new_zeros(0), cov.new_zeros(d, 0)
    if k >= d - 1:  # ARPACK needs k < D - 1
        lam, vec = torch.linalg.eigh(cov)
        return lam.flip(0)[:k], vec.flip(1)[:, :k]

    def product(x: np.ndarray) -> np.ndarray:
        return (cov @ torch.from_numpy(np.ascontiguousarray(x)).to(cov.device)).cpu().numpy()

    v0 = np.random.default_rng(seed).standard_normal(d)  # ARPACK's own start vector is not reproducible
    op = LinearOperator((d, d), matvec=product, matmat=product, dtype=np.float64)
    lam, vec = eigsh(op, k=k, which="LA", v0=v0)
    order = np.argsort(lam)[::-1].copy()
    return torch.from_numpy(lam[order]).to(cov.device), torch.from_numpy(vec[:, order]).to(cov.device)


def rademacher_probes(dim: int, probes: int, seed: int) -> Tensor:
    """[probes, D] float64 of ±1, from ``seed`` (CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (probes, dim), generator=generator).to(torch.float64) * 2.0 - 1.0


def lanczos(apply, start: Tensor, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos tridiagonalisation of a symmetric operator from each row of ``start`` [m, D], all probes in
    lockstep (``apply`` maps [m, D] -> [m, D]: one block product per step), with full
    reorthogonalisation (classical Gram-Schmidt, twice, against the probe's own basis). Returns the
    diagonals alpha [m, s] and off-diagonals beta [m, s - 1]; a probe whose Krylov space is exhausted
    (β ≈ 0: its start vector lies in an invariant subspace) gets β = 0 there, which decouples the rest of
    its T (zero first components: zero quadrature weight).
    """
    m, d = start.shape
    steps = max(1, min(steps, d))
    basis = start.new_zeros(m, steps, d)  # [m, s, D]
    alpha = start.new_zeros(m, steps)
    beta = start.new_zeros(m, max(steps - 1, 0))
    q = start / torch.linalg.vector_norm(start, dim=1, keepdim=True)  # [m, D]
    scale = 0.0
    for j in range(steps):
        basis[:, j] = q
        w = apply(q)  # [m, D]
        alpha[:, j] = (q * w).sum(dim=1)
        scale = max(scale, float(alpha[:, j].abs().max()))
        if j == steps - 1:
            break
        kept = basis[:, : j + 1]  # [m, j+1, D]
        for _ in range(2):  # CGS2; subsumes the three-term recurrence
            w = w - torch.bmm(torch.bmm(kept, w.unsqueeze(2)).transpose(1, 2), kept).squeeze(1)
        b = torch.linalg.vector_norm(w, dim=1)  # [m]
        alive = b > 1e-10 * max(scale, torch.finfo(torch.float64).tiny)
        beta[:, j] = torch.where(alive, b, 0.0)
        q = torch.where(alive.unsqueeze(1), w / torch.where(alive, b, 1.0).unsqueeze(1), 0.0)
    return alpha.cpu().numpy(), beta.cpu().numpy()


def gauss_quadrature(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nodes θ [m, s] (eigenvalues of each T) and weights τ² [m, s] (squared first components)."""
    nodes, weights = np.empty_like(alpha), np.empty_like(alpha)
    for probe in range(alpha.shape[0]):
        theta, u = eigh_tridiagonal(alpha[probe], beta[probe])
        nodes[probe], weights[probe] = theta, u[0] ** 2
    return nodes, weights


def slq_trace(apply, dim: int, function, probes: int, steps: int, seed: int = DEFAULT_SEED):
    """Stochastic Lanczos quadrature of tr f(A) for a symmetric operator ``apply`` ([m, D] -> [m, D]):
    per-probe estimates D Σ_j τ_j² f(θ_j) (Rademacher probes from ``seed``), their mean, and its standard
    error. Returns (mean, stderr, per_probe [m], nodes [m, s], weights [m, s]).

    >>> a = torch.diag(torch.tensor([3.0, 1.0, 1.0, 0.5], dtype=torch.float64))  # diagonal: exact
    >>> mean, stderr, *_ = slq_trace(lambda x: x @ a, 4, np.log1p, probes=3, steps=4)
    >>> round(mean, 12) == round(float(torch.log1p(a.diagonal()).sum()), 12), round(stderr, 12)
    (True, 0.0)
    """
    start = rademacher_probes(dim, probes, seed)
    nodes, weights = gauss_quadrature(*lanczos(apply, start, steps))
    per_probe = dim * (weights * function(nodes)).sum(axis=1)
    stderr = float(per_probe.std(ddof=1) / math.sqrt(probes)) if probes > 1 else math.nan
    return float(per_probe.mean()), stderr, per_probe, nodes, weights


def control_variate_mean(y: np.ndarray, controls: np.ndarray) -> tuple[float, float]:
    """Mean of ``y`` [m] corrected by zero-mean ``controls`` [m, c] (least-squares coefficients), and its
    standard error; with too few probes for the regression, the plain mean and std/√m."""
    m = y.shape[0]
    if m < 2:
        return float(y.mean()), math.nan
    scale = np.abs(controls).max(axis=0)
    usable = controls[:, scale > 0] / scale[scale > 0]
    c = usable.shape[1]
    if m <= c + 2 or c == 0:
        return float(y.mean()), float(y.std(ddof=1) / math.sqrt(m))
    design = np.column_stack([np.ones(m), usable])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residuals = y - design @ coef
    variance = (residuals**2).sum() / (m - c - 1)  # residual variance; the intercept's is σ² (XᵀX)⁻¹₀₀
    return float(coef[0]), float(math.sqrt(variance * np.linalg.pinv(design.T @ design)[0, 0]))
