"""The accelerator code paths run on CPU tensors: sync-free updates and the bf16 split product.

On accelerators :class:`CovarianceAccumulator` and :class:`FFNTracker` never read a tensor on the host
while the model runs: masks and the finiteness test become row weights, the counts stay on the device.
Half rows are multiplied on tensor cores by :func:`nerve_hf.stats.kernels.split_gram`. Both paths are
selected by device type, so here they are forced onto the CPU and checked against float64 references
and against the host path. ``tests/test_cuda.py`` runs them on a GPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from reference import rel_err, two_pass
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_helpers import tiny_gpt2

from nerve_hf.stats import kernels as scatter
from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.tracking.points import FFNHookPoints
from nerve_hf.tracking.tracker import FFNTracker

# aten ops that copy a value to the host (what bool(t), t.item(), t.tolist() and boolean indexing call)
HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "item"}


class HostReads(TorchDispatchMode):
    """Records every aten op that would wait for the device if these were CUDA tensors."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_path(monkeypatch):
    """CPU tensors take the accelerator's sync-free path."""
    monkeypatch.setattr(CovarianceAccumulator, "HOST_SYNC_DEVICE_TYPES", ())


@pytest.fixture
def split_on_cpu(monkeypatch):
    """CPU half rows take the tensor-core split product (with exact fp32 products standing in)."""
    monkeypatch.setattr(scatter, "SPLIT_PRODUCT_DEVICE_TYPES", ("cpu",))


def batches(dtype, seed=0):
    """Three batches [n, 29] with large means, a mask each, and NaN/Inf in some rows."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(29, 29, generator=generator)
    out = []
    for n in (41, 7, 64):
        rows = 3.0 + torch.randn(n, 29, generator=generator) @ mixing
        mask = torch.rand(n, generator=generator) > 0.3
        out.append((rows, mask))
    out[0][0][2, 5] = float("nan")
    out[2][0][[0, 9], 3] = float("inf")
    out[0][1][2] = out[2][1][0] = True  # two non-finite rows kept by the mask: skipped
    out[2][1][9] = False  # a masked-out Inf row is neither counted nor skipped
    return [(rows.to(dtype), mask) for rows, mask in out]


def kept_rows(data) -> torch.Tensor:
    rows = torch.cat([rows[mask] for rows, mask in data]).double()
    return rows[torch.isfinite(rows).all(dim=1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sync_free_update_equals_the_host_path_and_float64(device_path, dtype):
    data = batches(dtype)
    acc = CovarianceAccumulator(29)
    for rows, mask in data:
        acc.update(rows, mask)
    assert acc._pending is not None  # counts are still on the "device"
    reference = kept_rows(data)
    with pytest.warns(RuntimeWarning, match="skipped 2 of"):
        assert acc.count == reference.shape[0]
    assert acc.skipped == 2
    tolerance = {torch.float64: 1e-13, torch.float32: 1e-6, torch.bfloat16: 1e-6}[dtype]
    assert rel_err(acc.covariance(), two_pass(reference)) < tolerance
    np.testing.assert_allclose(acc.mean().numpy(), reference.mean(0).numpy(), rtol=tolerance, atol=tolerance)


def test_sync_free_counts_merge_and_persist_like_host_counts(device_path):
    data = batches(torch.float32, seed=3)
    device = CovarianceAccumulator(29)
    for rows, mask in data[:2]:
        device.update(rows, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        host = CovarianceAccumulator(29)
        rows, mask = data[2]
        host._update_rows(rows[mask])
        device.merge(host)  # pending counts joined by host counts
        state = device.state_dict()
    restored = CovarianceAccumulator(29)
    restored.load_state_dict(state)
    assert state["count"] == kept_rows(data).shape[0] and state["skipped"] == 2
    assert rel_err(restored.covariance(), two_pass(kept_rows(data))) < 1e-6


def test_an_all_masked_batch_changes_nothing(device_path):
    acc = CovarianceAccumulator(5)
    rows = torch.randn(8, 5, dtype=torch.float64)
    acc.update(rows)
    before = acc.covariance().clone()
    acc.update(torch.full((4, 5), float("nan")), torch.zeros(4, dtype=torch.bool))
    assert acc.count == 8 and acc.skipped == 0
    torch.testing.assert_close(acc.covariance(), before, rtol=0, atol=0)


def test_the_device_path_never_reads_a_tensor_on_the_host(device_path):
    rows, mask = batches(torch.float32)[2]
    acc = CovarianceAccumulator(29)
    with HostReads() as reads:
        acc.update(rows, mask)
        acc.update(rows)
    assert reads.seen == []
    with HostReads() as reads:  # the check sees the host path's reads, so it can fail
        host = CovarianceAccumulator(29)
        host.HOST_SYNC_DEVICE_TYPES = ("cpu",)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            host.update(rows, mask)
    assert reads.seen


def test_tracked_forward_with_padding_and_a_token_cap_has_no_host_read_in_its_hooks(device_path, monkeypatch):
    model = tiny_gpt2().eval()
    ids = torch.randint(1, 50, (3, 11), generator=torch.Generator().manual_seed(0))
    attention = torch.ones(3, 11, dtype=torch.long)
    attention[1, 7:] = 0
    attention[2, 4:] = 0
    reads = HostReads()
    original = FFNHookPoints.record

    def record_watched(self, *args, **kwargs):
        with reads:
            return original(self, *args, **kwargs)

    host_tracker = FFNTracker(model, max_tokens=20)
    with host_tracker, torch.no_grad():
        model(ids, attention_mask=attention)
    expected = host_tracker.compute()
    monkeypatch.setattr(FFNHookPoints, "record", record_watched)
    tracker = FFNTracker(model, max_tokens=20)
    with tracker, torch.no_grad():
        model(ids, attention_mask=attention)
    assert reads.seen == []
    got = tracker.compute()
    assert [row["tokens"] for row in got.rows] == [row["tokens"] for row in expected.rows] == [20, 20]
    for row, want in zip(got.rows, expected.rows):
        for name in ("se_pre", "pr_pre", "eee_pre", "se_post", "pr_post", "eee_post", "js"):
            assert row[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), name


def test_split_parts_sum_back_to_fp32_round_off():
    generator = torch.Generator().manual_seed(1)
    centred = torch.randn(300, 17, generator=generator) * torch.logspace(-20, 20, 17)
    high, middle, low = scatter.split_parts(centred)
    assert high.dtype == middle.dtype == low.dtype == torch.bfloat16
    total = high.double() + middle.double() + low.double()
    error = (total - centred.double()).abs() / centred.double().abs()
    assert float(error.max()) <= 2.0**-24
    assert (
        float(((high.double() - centred.double()).abs() / centred.double().abs()).max()) > 2.0**-12
    )  # bf16 alone is not


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_product_covariance_is_fp32_class(split_on_cpu, dtype):
    generator = torch.Generator().manual_seed(2)
    mixing = torch.randn(37, 37, generator=generator)
    rows = (4.0 + torch.randn(3000, 37, generator=generator) @ mixing).to(dtype)
    reference = two_pass(rows)
    split = CovarianceAccumulator(37)
    for chunk in rows.split(700):
        split.update(chunk)
    naive_bf16 = rows.double() - rows.double().mean(0)
    naive_bf16 = naive_bf16.to(torch.bfloat16).double()
    one_gemm_error = rel_err(naive_bf16.T @ naive_bf16 / (len(rows) - 1), reference)
    assert rel_err(split.covariance(), reference) < 1e-6 < one_gemm_error  # one bf16 GEMM: ~1e-3


def test_split_product_is_used_only_for_half_rows_on_its_devices(split_on_cpu, monkeypatch):
    calls = []
    monkeypatch.setattr(scatter, "split_gram", lambda centred, out, accumulate: calls.append(centred.shape) or out)
    scatter.shifted_moments(torch.randn(10, 6))
    assert calls == []
    scatter.shifted_moments(torch.randn(10, 6).bfloat16())
    assert calls == [(10, 6)]
