"""NerVE spectral metrics: pure functions on covariance eigenvalues.

Every function takes eigenvalues ``[..., D]`` (any order, any float dtype), works in float64,
clamps tiny negative round-off to zero and is batched over the leading dimensions. A spectrum whose
total variance is zero (or not finite) has no defined distribution ``p = λ / Σλ``: its metrics are
NaN, never an exception and never a made-up number.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "normalized_spectrum",
    "spectral_entropy",
    "participation_ratio",
    "early_enrichment",
    "js_divergence",
    "spectrum_metrics",
    "METRIC_NAMES",
]

METRIC_NAMES = ("se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post", "js")


def _as_spectrum(eigvals: Tensor) -> Tensor:
    """Eigenvalues as float64, sorted descending, negatives clamped to 0.  [..., D] -> [..., D]"""
    eigvals = torch.as_tensor(eigvals)
    if eigvals.ndim == 0:
        raise ValueError("eigenvalues need a last dimension D, got a scalar")
    if eigvals.shape[-1] == 0:
        raise ValueError("eigenvalues need at least one entry in the last dimension, got D = 0")
    lam = eigvals.to(torch.float64).clamp_min(0.0)  # NaN stays NaN
    return lam.sort(dim=-1, descending=True).values


def _total(lam: Tensor) -> Tensor:
    """Σλ with NaN where the spectrum has no defined distribution.  [..., D] -> [..., 1]"""
    total = lam.sum(dim=-1, keepdim=True)
    undefined = ~torch.isfinite(total) | (total <= 0)
    return total.masked_fill(undefined, float("nan"))


def normalized_spectrum(eigvals: Tensor) -> Tensor:
    """p = λ / Σλ, sorted descending, float64; all-NaN rows where Σλ = 0.  [..., D] -> [..., D]

    >>> normalized_spectrum(torch.tensor([1.0, 3.0]))
    tensor([0.7500, 0.2500], dtype=torch.float64)
    """
    lam = _as_spectrum(eigvals)
    return lam / _total(lam)


# The private functions below take normalised spectra p [..., D] (descending, float64).


def _entropy(p: Tensor) -> Tensor:
    return 0.0 - torch.special.xlogy(p, p).sum(dim=-1)  # 0.0 - x avoids printing -0.


def _participation(p: Tensor) -> Tensor:
    return 1.0 / p.square().sum(dim=-1)


def _enrichment(p: Tensor) -> Tensor:
    d = p.shape[-1]
    uniform_cumsum = torch.arange(1, d + 1, dtype=p.dtype, device=p.device) / d  # [D]
    return (2.0 / d) * (p.cumsum(dim=-1) - uniform_cumsum).sum(dim=-1)


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p‖q) with 0·log(0/q) = 0."""
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(dim=-1)


def _jensen_shannon(p: Tensor, q: Tensor) -> Tensor:
    if p.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"pre and post spectra must have the same length D to be compared index by index, "
            f"got {p.shape[-1]} and {q.shape[-1]}"
        )
    m = 0.5 * (p + q)
    return 0.5 * _kl(p, m) + 0.5 * _kl(q, m)


def spectral_entropy(eigvals: Tensor) -> Tensor:
    """Spectral entropy SE = -Σ p_i ln p_i (natural log, not normalised).  [..., D] -> [...]

    Range [0, ln D]: 0 when one direction holds all variance, ln D for an isotropic spectrum.

    >>> spectral_entropy(torch.ones(4))  # ln 4
    tensor(1.3863, dtype=torch.float64)
    >>> spectral_entropy(torch.tensor([5.0, 0.0, 0.0]))
    tensor(0., dtype=torch.float64)
    """
    return _entropy(normalized_spectrum(eigvals))


def participation_ratio(eigvals: Tensor) -> Tensor:
    """Participation ratio PR = (Σλ)² / Σλ², the effective number of directions.  [..., D] -> [...]

    Range [1, D]. Equals tr(Σ)² / ‖Σ‖_F², so it needs no eigendecomposition (see
    :func:`nerve_hf.covariance.participation_ratio_from_covariance`).

    >>> round(participation_ratio(torch.ones(5)).item(), 12)
    5.0
    >>> participation_ratio(torch.tensor([2.0, 0.0]))
    tensor(1., dtype=torch.float64)
    """
    return _participation(normalized_spectrum(eigvals))


def early_enrichment(eigvals: Tensor) -> Tensor:
    """Eigenvalue early enrichment EEE = (2/D) Σ_k (Σ_{i≤k} p_i − k/D).  [..., D] -> [...]

    How much faster the cumulative variance of the sorted spectrum rises than a uniform spectrum's.
    Range [0, 1): 0 for an isotropic spectrum, (D−1)/D when one direction holds all variance.

    >>> early_enrichment(torch.ones(8))
    tensor(0., dtype=torch.float64)
    >>> early_enrichment(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # (D-1)/D
    tensor(0.7500, dtype=torch.float64)
    """
    return _enrichment(normalized_spectrum(eigvals))


def js_divergence(eig_pre: Tensor, eig_post: Tensor) -> Tensor:
    """Jensen–Shannon divergence between two normalised spectra.  [..., D] x [..., D] -> [...]

    JS = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2, natural log, the spectra compared index by index
    after sorting each in descending order. Range [0, ln 2]; NaN if either spectrum has zero variance.

    >>> js_divergence(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]))
    tensor(0., dtype=torch.float64)
    >>> js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    tensor(0.2158, dtype=torch.float64)
    """
    return _jensen_shannon(normalized_spectrum(eig_pre), normalized_spectrum(eig_post))


def spectrum_metrics(eig_pre: Tensor, eig_post: Tensor) -> dict[str, Tensor]:
    """All seven NerVE numbers for pre/post spectra.  [..., D] x [..., D] -> {name: [...]}

    Keys (in :data:`METRIC_NAMES` order): ``se_pre se_post pr_pre pr_post eee_pre eee_post js``.

    >>> m = spectrum_metrics(torch.ones(3), torch.tensor([1.0, 0.0, 0.0]))
    >>> [round(m[k].item(), 4) for k in ("se_pre", "pr_post", "eee_post")]
    [1.0986, 1.0, 0.6667]
    """
    p, q = normalized_spectrum(eig_pre), normalized_spectrum(eig_post)
    return {
        "se_pre": _entropy(p),
        "se_post": _entropy(q),
        "pr_pre": _participation(p),
        "pr_post": _participation(q),
        "eee_pre": _enrichment(p),
        "eee_post": _enrichment(q),
        "js": _jensen_shannon(p, q),
    }
