"""NerVE spectral metrics: pure functions on covariance eigenvalues.

Every function takes eigenvalues ``[..., D]`` (any order, any float dtype), works in float64 and is
batched over the leading dimensions: each spectrum (one row along the last dimension) becomes the
distribution ``p = λ / Σλ``, sorted descending, by these rules.

- A spectrum holding any non-finite eigenvalue (NaN, +Inf or -Inf) has no distribution: its ``p``
  is all NaN, so every metric of that spectrum is NaN, and JS is NaN when either side is. The other
  spectra of a batch are unaffected.
- A spectrum whose total variance is zero has no distribution either: its metrics are NaN.
- A covariance has no negative eigenvalues, so a negative one is clamped to 0. Down to
  ``-tol`` with ``tol = 100 · D · eps · max|λ|`` (``max|λ|`` over that spectrum, ``eps`` the larger
  of float32's and that of the eigenvalues' own floating dtype: the covariances this package builds
  are float32 products unless the activations are float64) it is
  taken for round-off and clamped silently; one below ``-tol`` is clamped as well, and each call
  that meets one emits a single ``RuntimeWarning`` giving the most negative ``λ / max|λ|`` seen.

Undefined metrics are NaN, never an exception and never a made-up number.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "normalized_spectrum",
    "spectral_entropy",
    "participation_ratio",
    "early_enrichment",
    "js_divergence",
    "spectrum_metrics",
    "padded_js",
    "METRIC_NAMES",
]

METRIC_NAMES = ("se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post", "js")


_ROUND_OFF_PER_DIM = 100  # negatives down to -100·D·eps·max|λ| are round-off, clamped without a warning
_FP32_EPS = torch.finfo(torch.float32).eps


def _as_spectrum(eigvals: Tensor) -> tuple[Tensor, float]:
    """Eigenvalues as float64, sorted descending, ready to normalise.  [..., D] -> ([..., D], worst)

    Rows holding NaN or ±Inf become all NaN; negatives are clamped to 0. ``worst`` is the most
    negative λ / max|λ| among the eigenvalues below ``-100 · D · eps · max|λ|`` of their row (``eps``
    at least float32's), or 0.0 where there is none.
    """
    eigvals = torch.as_tensor(eigvals)
    if eigvals.ndim == 0:
        raise ValueError("eigenvalues need a last dimension D, got a scalar")
    if eigvals.shape[-1] == 0:
        raise ValueError("eigenvalues need at least one entry in the last dimension, got D = 0")
    # The covariances behind these eigenvalues are fp32 products unless the activations were fp64, so
    # round-off is judged at float32's precision at the finest.
    eps = max(torch.finfo(eigvals.dtype if eigvals.is_floating_point() else torch.float64).eps, _FP32_EPS)
    lam = eigvals.to(torch.float64)  # [..., D]
    lam = lam.masked_fill(~torch.isfinite(lam).all(dim=-1, keepdim=True), float("nan"))
    scale = lam.abs().amax(dim=-1, keepdim=True)  # [..., 1] max|λ|; NaN on non-finite rows
    clear = lam < -_ROUND_OFF_PER_DIM * lam.shape[-1] * eps * scale  # [..., D]; False on NaN rows
    ratios = torch.where(clear, lam / scale, 0.0)  # [..., D]
    worst = float(ratios.min()) if ratios.numel() else 0.0
    return lam.clamp_min(0.0).sort(dim=-1, descending=True).values, worst


def _distributions(*spectra: Tensor) -> list[Tensor]:
    """p = λ / Σλ of each of ``spectra`` ``[..., D]``, with one warning for all their clearly negative λ.

    Called straight from the public functions: the warning points at their caller.
    """
    lams, worst = [], 0.0
    for eigvals in spectra:
        lam, low = _as_spectrum(eigvals)
        lams.append(lam)
        worst = min(worst, low)
    if worst < 0:
        warnings.warn(
            f"nerve_hf.metrics: an eigenvalue is {worst:.1e} times the largest |eigenvalue| of its spectrum, "
            f"more negative than round-off (100 * D * eps * max|eigenvalue|); a covariance has no negative "
            f"eigenvalues, so it was clamped to 0 and the metrics describe the rest of that spectrum.",
            RuntimeWarning,
            stacklevel=3,
        )
    return [lam / _total(lam) for lam in lams]


def _total(lam: Tensor) -> Tensor:
    """Σλ with NaN where the spectrum has no defined distribution.  [..., D] -> [..., 1]"""
    total = lam.sum(dim=-1, keepdim=True)
    undefined = ~torch.isfinite(total) | (total <= 0)
    return total.masked_fill(undefined, float("nan"))


def normalized_spectrum(eigvals: Tensor) -> Tensor:
    """p = λ / Σλ, sorted descending, float64.  [..., D] -> [..., D]

    Rows are all NaN where Σλ = 0 or an eigenvalue is NaN or ±Inf; negatives are clamped to 0.

    >>> normalized_spectrum(torch.tensor([1.0, 3.0]))
    tensor([0.7500, 0.2500], dtype=torch.float64)
    """
    (p,) = _distributions(eigvals)
    return p


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
    (p,) = _distributions(eigvals)
    return _entropy(p)


def participation_ratio(eigvals: Tensor) -> Tensor:
    """Participation ratio PR = (Σλ)² / Σλ², the effective number of directions.  [..., D] -> [...]

    Range [1, D]. Equals tr(Σ)² / ‖Σ‖_F², so it needs no eigendecomposition (see
    :func:`nerve_hf.spectra.participation_ratio_from_covariance`).

    >>> round(participation_ratio(torch.ones(5)).item(), 12)
    5.0
    >>> participation_ratio(torch.tensor([2.0, 0.0]))
    tensor(1., dtype=torch.float64)
    """
    (p,) = _distributions(eigvals)
    return _participation(p)


def early_enrichment(eigvals: Tensor) -> Tensor:
    """Eigenvalue early enrichment EEE = (2/D) Σ_k (Σ_{i≤k} p_i − k/D).  [..., D] -> [...]

    How much faster the cumulative variance of the sorted spectrum rises than a uniform spectrum's.
    Range [0, 1): 0 for an isotropic spectrum, (D−1)/D when one direction holds all variance.

    >>> early_enrichment(torch.ones(8))
    tensor(0., dtype=torch.float64)
    >>> early_enrichment(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # (D-1)/D
    tensor(0.7500, dtype=torch.float64)
    """
    (p,) = _distributions(eigvals)
    return _enrichment(p)


def js_divergence(eig_pre: Tensor, eig_post: Tensor) -> Tensor:
    """Jensen–Shannon divergence between two normalised spectra.  [..., D] x [..., D] -> [...]

    JS = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q)/2, natural log, the spectra compared index by index
    after sorting each in descending order. Range [0, ln 2]; NaN if either spectrum has no distribution.

    >>> js_divergence(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 1.0]))
    tensor(0., dtype=torch.float64)
    >>> js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
    tensor(0.2158, dtype=torch.float64)
    """
    return _jensen_shannon(*_distributions(eig_pre, eig_post))


def spectrum_metrics(eig_pre: Tensor, eig_post: Tensor) -> dict[str, Tensor]:
    """All seven NerVE numbers for pre/post spectra.  [..., D] x [..., D] -> {name: [...]}

    Keys (in :data:`METRIC_NAMES` order): ``se_pre se_post pr_pre pr_post eee_pre eee_post js``.

    >>> m = spectrum_metrics(torch.ones(3), torch.tensor([1.0, 0.0, 0.0]))
    >>> [round(m[k].item(), 4) for k in ("se_pre", "pr_post", "eee_post")]
    [1.0986, 1.0, 0.6667]
    """
    p, q = _distributions(eig_pre, eig_post)
    return {
        "se_pre": _entropy(p),
        "se_post": _entropy(q),
        "pr_pre": _participation(p),
        "pr_post": _participation(q),
        "eee_pre": _enrichment(p),
        "eee_post": _enrichment(q),
        "js": _jensen_shannon(p, q),
    }


def padded_js(eig_a: Optional[Tensor], eig_b: Optional[Tensor]) -> float:
    """JS between two spectra of possibly different lengths: each normalised and sorted descending, the
    shorter zero-padded to the longer length. NaN if either is missing or has no distribution.

    >>> padded_js(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0, 0.0]))
    0.0
    """
    if eig_a is None or eig_b is None:
        return math.nan
    a, b = torch.as_tensor(eig_a, dtype=torch.float64), torch.as_tensor(eig_b, dtype=torch.float64)
    length = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a, (0, length - a.shape[-1]))
    b = torch.nn.functional.pad(b, (0, length - b.shape[-1]))
    return float(js_divergence(a, b))
