"""The embedded image set: scikit-learn's handwritten digits, real data a package ships (DESIGN §6).

1797 grey 8x8 images of the digits 0-9 (the UCI set bundled with scikit-learn); nothing is downloaded.

    >>> from nerve_hf.data import load_digits
    >>> images, labels = load_digits()
    >>> images.shape, float(images.min()), float(images.max()), labels[:5].tolist()
    ((1797, 8, 8), 0.0, 1.0, [0, 1, 2, 3, 4])
"""

from __future__ import annotations

from nerve_hf.errors import requires

__all__ = ["DIGITS_SOURCE", "load_digits"]

DIGITS_SOURCE = "sklearn.datasets.load_digits"  # provenance string for result files


def load_digits():
    """``(images, labels)``: float64 ``[1797, 8, 8]`` grey values scaled to [0, 1] (exact multiples of 1/16),
    int64 ``[1797]`` classes 0-9, in scikit-learn's order."""
    import numpy as np

    with requires("probe"):
        from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    return digits.images / 16.0, digits.target.astype(np.int64)  # raw grey values are integers 0..16
