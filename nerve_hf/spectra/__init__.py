"""Spectra: covariances -> eigenvalues -> metric values, the one place where nerve_hf computes them.

* :mod:`~nerve_hf.spectra.exact`: batched ``eigvalsh`` under a memory bound, PR by the trace identity, and
  the metrics of (pre, post) pairs from exact spectra;
* :mod:`~nerve_hf.spectra.estimate`: the metrics of wide FFNs without a full eigendecomposition, built on
  :mod:`~nerve_hf.spectra.slq` (stochastic Lanczos quadrature and ARPACK's top-k eigenpairs);
* :mod:`~nerve_hf.spectra.values`: :func:`metric_values`, the entry point that picks one of them.
"""

from nerve_hf.spectra.exact import (
    EIGEN_BATCH_BYTES,
    METRIC_SETS,
    SPECTRA_DTYPES,
    SPECTRA_METHODS,
    eigen_batches,
    eigenvalues_batched,
    exact_metric_values,
    nan_rows,
    nan_values,
    participation_ratio_from_covariance,
    spectra_of,
)
from nerve_hf.spectra.values import extra_values, metric_set, metric_values

__all__ = [
    "EIGEN_BATCH_BYTES",
    "METRIC_SETS",
    "SPECTRA_DTYPES",
    "SPECTRA_METHODS",
    "eigen_batches",
    "eigenvalues_batched",
    "exact_metric_values",
    "extra_values",
    "metric_set",
    "metric_values",
    "nan_rows",
    "nan_values",
    "participation_ratio_from_covariance",
    "spectra_of",
]
