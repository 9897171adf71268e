"""Independent float64 NumPy references shared by the covariance tests."""

import numpy as np
import torch


def two_pass(rows) -> np.ndarray:
    """Reference covariance: float64 NumPy, mean first, then the centred products."""
    rows = np.asarray(torch.as_tensor(rows).double().reshape(-1, np.shape(rows)[-1]))
    centred = rows - rows.mean(axis=0)
    return centred.T @ centred / (rows.shape[0] - 1)


def rel_err(got: torch.Tensor, ref: np.ndarray) -> float:
    """Relative Frobenius error of ``got`` against ``ref``."""
    return float(np.linalg.norm(got.cpu().numpy() - ref) / np.linalg.norm(ref))
