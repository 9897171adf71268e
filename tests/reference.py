"""Independent float64 NumPy references and comparisons shared by several test files."""

import numpy as np
import pytest
import torch

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.spectral_report import ROW_KEYS


def two_pass(rows) -> np.ndarray:
    """Reference covariance: float64 NumPy, mean first, then the centred products."""
    rows = np.asarray(torch.as_tensor(rows).double().reshape(-1, np.shape(rows)[-1]))
    centred = rows - rows.mean(axis=0)
    return centred.T @ centred / (rows.shape[0] - 1)


def rel_err(got: torch.Tensor, ref: np.ndarray) -> float:
    """Relative Frobenius error of ``got`` against ``ref``."""
    return float(np.linalg.norm(got.cpu().numpy() - ref) / np.linalg.norm(ref))


def assert_rows_equal(rows, expected, rel=1e-9, abs=1e-12):
    """Metric rows (``SpectralReport.rows`` or report.json's) equal ``expected``: the same sites in the same
    order, exactly the row keys, the same layer, width and token count, every metric within ``rel``/``abs``."""
    assert [r["site"] for r in rows] == [e["site"] for e in expected]
    for row, want in zip(rows, expected):
        assert set(row) == set(ROW_KEYS)
        assert (row["layer"], row["dim"], row["tokens"]) == (want["layer"], want["dim"], want["tokens"])
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(want[name], rel=rel, abs=abs), (row["site"], name)
