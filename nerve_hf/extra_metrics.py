"""Summaries of the same eigenvalues beyond the paper's four metrics: pure, batched functions.

Each takes eigenvalues ``[..., D]`` (any order; the non-finite and zero-variance rules of
:mod:`nerve_hf.metrics` apply: such spectra give NaN) and returns ``[...]`` float64.

* **effective rank** ``exp(SE)`` (Roy & Vetterli, "The effective rank", EUSIPCO 2007): the number of
  equally strong directions with the same entropy; range [1, D].
* **stable rank** ``Σλ / λ_max`` (Rudelson & Vershynin 2007, ``‖A‖²_F / ‖A‖²_2`` of a factor A of Σ):
  range [1, D], dominated by the top direction.
* **α-ReQ exponent** α (Agrawal et al., "α-ReQ", NeurIPS 2022): the least-squares slope of log λᵢ
  against log i, negated, over the ranks i = 1 … k where k counts the eigenvalues above
  ``1e-6 · λ_max`` (the numerically non-zero ones: the pre-activation covariance of a d-wide model has
  rank ≤ d, and its zero tail has no logarithm). λᵢ ∝ i^(−α); NaN with fewer than 3 such ranks.
* **finite-sample-corrected PR** for a covariance estimated from n rows: the plain PR = (Σλ)² / Σλ² of a
  sample covariance is biased low when n is not ≫ D (isotropic Σ: E PR ≈ D / (1 + D/n)). Here
  (tr Σ)² and tr(Σ²) are replaced by their unbiased estimates under Gaussian rows, from the Wishart
  moments of S with m = n − 1 degrees of freedom::

      E[(tr S)²] = (tr Σ)² + 2 tr(Σ²)/m,    E[tr(S²)] = (1 + 1/m) tr(Σ²) + (tr Σ)²/m

  solved for (tr Σ)² and tr(Σ²), and PR_c = their ratio (a ratio of unbiased estimates; see also the
  bias-corrected estimators of arXiv 2509.26560). NaN for n < 3.

>>> import torch
>>> lam = 1 / torch.arange(1, 9, dtype=torch.float64)  # an exact power law, α = 1
>>> [round(float(f(lam)), 4) for f in (effective_rank, stable_rank, alpha_exponent)]
[6.1463, 2.7179, 1.0]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nerve_hf.metrics import normalized_spectrum, spectral_entropy

__all__ = [
    "EXTRA_METRIC_NAMES",
    "effective_rank",
    "stable_rank",
    "alpha_exponent",
    "corrected_participation_ratio",
    "extra_metrics",
]

EXTRA_METRIC_NAMES = (
    "erank_pre", "erank_post", "srank_pre", "srank_post", "alpha_pre", "alpha_post", "prc_pre", "prc_post",
)  # fmt: skip
ALPHA_FLOOR = 1e-6  # α-ReQ: ranks whose eigenvalue exceeds this share of λ_max are fitted


def effective_rank(eigvals: Tensor) -> Tensor:
    """exp(SE).  [..., D] -> [...]"""
    return torch.exp(spectral_entropy(eigvals))


def stable_rank(eigvals: Tensor) -> Tensor:
    """Σλ / λ_max = 1 / p_max.  [..., D] -> [...]"""
    return 1.0 / normalized_spectrum(eigvals)[..., 0]


def alpha_exponent(eigvals: Tensor) -> Tensor:
    """α of λᵢ ∝ i^(−α): least-squares fit of log λ on log rank over the non-zero ranks.  [..., D] -> [...]"""
    p = normalized_spectrum(eigvals)  # [..., D] descending, NaN rows where undefined
    rank = torch.arange(1, p.shape[-1] + 1, dtype=torch.float64)  # [D]
    keep = p > ALPHA_FLOOR * p[..., :1]  # [..., D]; False on NaN rows
    x = torch.log(rank).expand_as(p)
    y = torch.log(p.clamp_min(torch.finfo(torch.float64).tiny))
    count = keep.sum(-1)  # [...]
    weight = keep.to(torch.float64)
    mean_x = (x * weight).sum(-1) / count.clamp_min(1)
    mean_y = (y * weight).sum(-1) / count.clamp_min(1)
    dx = (x - mean_x[..., None]) * weight
    slope = (dx * (y - mean_y[..., None])).sum(-1) / (dx * dx).sum(-1)
    return (-slope).masked_fill(count < 3, math.nan)


def corrected_participation_ratio(eigvals: Tensor, n: Tensor | int) -> Tensor:
    """PR from unbiased (Gaussian, Wishart-moment) estimates of (tr Σ)² and tr(Σ²), for a covariance of
    ``n`` rows (see the module doc).  [..., D], n [...] or int -> [...]"""
    lam = torch.as_tensor(eigvals).to(torch.float64)
    lam = lam.masked_fill(~torch.isfinite(lam).all(-1, keepdim=True), math.nan).clamp_min(0.0)
    m = torch.as_tensor(n, dtype=torch.float64) - 1.0  # degrees of freedom
    a, b = lam.sum(-1).square(), lam.square().sum(-1)  # (tr S)², tr(S²)
    det = (1.0 + 1.0 / m) - 2.0 / m.square()
    trace_sq = ((1.0 + 1.0 / m) * a - (2.0 / m) * b) / det  # unbiased (tr Σ)²
    frobenius_sq = (b - a / m) / det  # unbiased tr(Σ²)
    ratio = trace_sq / frobenius_sq
    return ratio.masked_fill(~((m >= 2) & (frobenius_sq > 0) & (a > 0)), math.nan)


def extra_metrics(eig_pre: Tensor, eig_post: Tensor, n_pre, n_post) -> dict[str, Tensor]:
    """All of :data:`EXTRA_METRIC_NAMES` for pre/post spectra of covariances of n_pre / n_post rows."""
    out = {}
    for side, eigs, n in (("pre", eig_pre, n_pre), ("post", eig_post, n_post)):
        out[f"erank_{side}"] = effective_rank(eigs)
        out[f"srank_{side}"] = stable_rank(eigs)
        out[f"alpha_{side}"] = alpha_exponent(eigs)
        out[f"prc_{side}"] = corrected_participation_ratio(eigs, n)
    return {name: out[name] for name in EXTRA_METRIC_NAMES}
