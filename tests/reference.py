"""Independent float64 NumPy references and comparisons shared by several test files."""

import numpy as np
import pytest
import torch

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.report import ROW_KEYS


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


def spectrum_reference(eigvals) -> dict:
    """NerVE metrics of one spectrum written straight from the paper's formulas (NumPy/SciPy float64):
    ``se``, ``pr``, ``eee`` and the normalised descending spectrum ``p``."""
    from scipy.stats import entropy

    lam = np.sort(np.clip(np.asarray(eigvals, dtype=np.float64), 0, None))[::-1]
    p = lam / lam.sum()
    d = len(p)
    return {
        "se": float(entropy(p)),  # natural log
        "pr": float(lam.sum() ** 2 / (lam**2).sum()),
        "eee": float(2.0 / d * sum(p[: k + 1].sum() - (k + 1) / d for k in range(d))),
        "p": p,
    }


def activation_metrics(pre, post) -> dict[str, float]:
    """The seven metrics of pre/post activation rows ``[N, D]``: two-pass covariance, NumPy eigenvalues,
    :func:`spectrum_reference`, and JS from SciPy."""
    from scipy.spatial.distance import jensenshannon

    a, b = (spectrum_reference(np.linalg.eigvalsh(two_pass(x))) for x in (pre, post))
    out = {f"{metric}_{side}": ref[metric] for side, ref in (("pre", a), ("post", b)) for metric in ("se", "pr", "eee")}
    out["js"] = float(jensenshannon(a["p"], b["p"]) ** 2)
    return {name: out[name] for name in ("se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post", "js")}
