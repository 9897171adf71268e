"""spectra: covariances to eigenvalues with one matrix per worker, and the float32 option."""

import threading

import numpy as np
import pytest
import torch

from nerve_hf import spectra
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.spectra import exact as exact_module
from nerve_hf.stats.covariance import CovarianceAccumulator


def accumulators(n: int, dim: int = 33, rank: int | None = None):
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        acc = CovarianceAccumulator(dim)
        basis = torch.randn(rank or dim, dim, dtype=torch.float64)
        acc.update(torch.randn(200, rank or dim, dtype=torch.float64) @ basis)
        out.append(acc)
    return out


def test_cpu_workers_hold_one_matrix_each_and_match_numpy(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    accs = accumulators(5)
    active, peak, shapes = [0], [0], []
    lock = threading.Lock()
    real = torch.linalg.eigvalsh

    def recording(matrix):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            shapes.append(tuple(matrix.shape))
        try:
            return real(matrix)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(torch.linalg, "eigvalsh", recording)
    monkeypatch.setattr(torch, "stack", lambda *a, **k: pytest.fail("no stack of matrices on the CPU path"))
    try:
        got = spectra.spectra_of(accs)
    finally:
        torch.set_num_threads(before)
    assert shapes == [(33, 33)] * 5  # one matrix per call, never a batch
    assert peak[0] <= 2  # at most one matrix per worker at a time
    assert torch.get_num_threads() == before
    for acc, eig in zip(accs, got):
        ref = np.sort(np.linalg.eigvalsh(acc.covariance().numpy()))[::-1]
        np.testing.assert_allclose(eig.numpy(), ref, rtol=1e-12, atol=1e-12 * ref[0])


def test_float32_spectra_are_close_on_a_rank_deficient_covariance():
    accs = accumulators(4, rank=20)  # 33 wide, rank 20: the pre-activation case
    pairs = [(accs[0], accs[1]), (accs[2], accs[3])]
    exact, _ = spectra.metric_values(pairs)
    fast, kept = spectra.metric_values(pairs, spectra_dtype="float32")
    assert kept[0][0].dtype == torch.float64  # returned as float64 whatever the decomposition
    for row64, row32 in zip(exact, fast):
        for name in METRIC_NAMES:
            assert row32[name] == pytest.approx(row64[name], rel=1e-4, abs=1e-6), name
            if name != "js":
                assert row32[name] != row64[name]  # really decomposed in float32
    with pytest.raises(ValueError, match="spectra_dtype"):
        spectra.spectra_of(accs, "float16")


def test_nonfinite_covariance_gives_a_nan_spectrum():
    acc = CovarianceAccumulator(5)
    acc.update(torch.randn(1, 5))  # one row: the covariance is undefined
    (eig,) = spectra.spectra_of([acc])
    assert eig.shape == (5,) and torch.isnan(eig).all()


def test_a_covariance_with_one_non_finite_entry_gets_a_nan_spectrum():
    finite = accumulators(1)[0]
    for bad in (float("nan"), float("inf"), float("-inf")):
        broken = CovarianceAccumulator(33)
        broken.load_state_dict(finite.state_dict())
        broken._m2[3, 7] = bad  # one off-diagonal entry
        assert not bool(exact_module.all_finite(broken.covariance()))
        good, nan = spectra.spectra_of([finite, broken])
        assert torch.isfinite(good).all() and torch.isnan(nan).all()
