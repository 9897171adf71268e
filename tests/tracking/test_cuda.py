"""The CUDA paths: TF32 guard, half-precision GEMMs, tracker and callback on a GPU.

Skipped where no GPU is present (CI has none); run them on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from reference import rel_err, two_pass
from trainer_helpers import make_trainer, tiny_gpt2

from nerve_hf import NerveCallback, NerveConfig
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.spectra import eigenvalues_batched
from nerve_hf.stats.covariance import CovarianceAccumulator, exact_fp32_matmul
from nerve_hf.tracking.points import FFNHookPoints
from nerve_hf.tracking.tracker import FFNTracker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture
def tf32_on():
    """Turn TF32 on for fp32 matmuls, as many training scripts do, and restore afterwards."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = True
    yield
    matmul.allow_tf32 = previous


def offset_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    """Rows with a large common offset and mixed scales (post-activation-like): [n, dim] fp32 on CUDA."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator)
    return (5.0 + torch.randn(n, dim, generator=generator) @ mixing).float().cuda()


def test_tf32_would_spoil_the_covariance_and_the_guard_keeps_it_out(tf32_on):
    rows = offset_rows(512, 257, seed=0)
    reference = two_pass(rows.cpu())
    centred = rows - rows.mean(0)
    tf32_error = rel_err((centred.T @ centred).double() / (len(rows) - 1), reference)
    acc = CovarianceAccumulator(257)
    for chunk in rows.split(200):
        acc.update(chunk)
    assert acc.covariance().device.type == "cuda"
    ours_error = rel_err(acc.covariance(), reference)
    # TF32 keeps 10 mantissa bits (~5e-4 per product); IEEE fp32 keeps 23
    assert tf32_error > 1e-5 and ours_error < 1e-6, (tf32_error, ours_error)
    assert torch.backends.cuda.matmul.allow_tf32  # the user's setting is restored


def test_guard_restores_the_setting_after_an_exception(tf32_on):
    with pytest.raises(RuntimeError):
        with exact_fp32_matmul(torch.device("cuda")):
            assert not torch.backends.cuda.matmul.allow_tf32
            raise RuntimeError("inside")
    assert torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_rows_multiply_with_fp32_accumulation(dtype):
    rows = offset_rows(6000, 129, seed=1).to(dtype)
    acc = CovarianceAccumulator(129)
    for chunk in rows.split(2048):
        acc.update(chunk)
    assert acc.count == 6000
    error = rel_err(acc.covariance(), two_pass(rows.cpu()))  # of the same (rounded) values
    assert error < 1e-6, error  # centred in the half type itself, the error was 5e-5 (fp16) / 5e-4 (bf16)


def test_nonfinite_rows_are_skipped_on_cuda():
    rows = offset_rows(500, 31, seed=2)
    rows[7, 3] = float("nan")
    rows[400, 0] = float("inf")
    acc = CovarianceAccumulator(31)
    acc.update(rows)  # counted on the GPU; the warning comes when the host reads the counts
    keep = torch.isfinite(rows).all(1)
    with pytest.warns(RuntimeWarning, match="skipped 2 of 500"):
        assert acc.count == 498
    assert acc.skipped == 2
    assert rel_err(acc.covariance(), two_pass(rows[keep].cpu())) < 1e-6


def test_batched_eigenvalues_on_cuda_equal_the_cpu():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(3, 64, 64, generator=generator, dtype=torch.float64)
    covs = [m @ m.T for m in base]
    on_gpu = eigenvalues_batched([c.cuda() for c in covs])
    on_cpu = eigenvalues_batched(covs)
    for gpu, cpu in zip(on_gpu, on_cpu):
        assert gpu.device.type == "cuda"
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tracker_on_cuda_matches_the_cpu(dtype, tf32_on):
    model = tiny_gpt2().eval()
    ids = torch.randint(1, 61, (4, 9), generator=torch.Generator().manual_seed(4))
    reports = {}
    for device in ("cpu", "cuda"):
        copy = tiny_gpt2().eval().to(device=device, dtype=dtype)
        copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
        tracker = FFNTracker(copy)
        with tracker, torch.no_grad():
            copy(ids.to(device))
        reports[device] = tracker.compute()
    cpu_rows, gpu_rows = reports["cpu"].rows, reports["cuda"].rows
    assert [r["tokens"] for r in gpu_rows] == [36, 36]
    # fp32: only GEMM summation order differs; bf16: the two devices round activations differently
    rtol = 1e-4 if dtype == torch.float32 else 0.1
    for cpu_row, gpu_row in zip(cpu_rows, gpu_rows):
        for name in ("se_pre", "se_post", "pr_pre", "pr_post"):
            assert math.isfinite(gpu_row[name])
            assert gpu_row[name] == pytest.approx(cpu_row[name], rel=rtol), name


def test_callback_trains_on_cuda_in_bf16(tmp_path):
    callback = NerveCallback(NerveConfig(every_n_steps=2))
    trainer = make_trainer(tmp_path, [callback], use_cpu=False, bf16=True, max_steps=4, eval_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing non-finite, nothing skipped
        trainer.train()
    assert next(trainer.model.parameters()).device.type == "cuda"
    logged = [record for record in trainer.state.log_history if "nerve/mean/pr_pre" in record]
    assert [record["step"] for record in logged] == [2, 4]
    for record in logged:
        assert 1.0 <= record["nerve/mean/pr_pre"] <= 37 and 1.0 <= record["nerve/mean/pr_post"] <= 37
        assert 0.0 <= record["nerve/mean/js"] <= math.log(2)
    evaluated = [record for record in trainer.state.log_history if "eval_nerve/mean/se_post" in record]
    assert evaluated and all(math.isfinite(r["eval_nerve/mean/se_post"]) for r in evaluated)


def test_state_in_host_memory_equals_state_on_the_gpu():
    model = tiny_gpt2().cuda().eval()
    ids = torch.randint(1, 61, (4, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    on_gpu, on_host = FFNTracker(model), FFNTracker(model, state_device="cpu")
    with on_gpu, on_host, torch.no_grad():
        model(input_ids=ids)
    assert on_host._states[0].pre.device == torch.device("cpu")
    for a, b in zip(on_gpu.compute().rows, on_host.compute().rows):
        for name in METRIC_NAMES:
            assert a[name] == pytest.approx(b[name], rel=1e-12, abs=1e-15), name


def test_tracked_forward_never_waits_for_the_gpu():
    """No host sync in any hook: padding mask, a token cap, NaN-free bf16 rows (item 3 of the perf issue)."""
    model = tiny_gpt2().cuda().to(torch.bfloat16).eval()
    ids = torch.randint(1, 61, (4, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    attention = torch.ones_like(ids)
    attention[1, 5:] = 0
    tracker = FFNTracker(model, max_tokens=30)
    recorded = FFNHookPoints.record

    def record_strictly(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return recorded(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    tracker.points.record = record_strictly.__get__(tracker.points)
    with tracker, torch.no_grad():
        model(ids, attention_mask=attention)
    assert [row["tokens"] for row in tracker.compute().rows] == [30, 30]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_product_on_tensor_cores_is_fp32_class(dtype):
    rows = offset_rows(8192, 257, seed=6).to(dtype)
    acc = CovarianceAccumulator(257)
    for chunk in rows.split(3000):
        acc.update(chunk)
    error = rel_err(acc.covariance(), two_pass(rows.cpu()))
    assert error < 1e-6, error


def test_eigenvalues_on_side_streams_equal_one_batched_call():
    from nerve_hf import spectra

    generator = torch.Generator().manual_seed(7)
    base = torch.randn(5, 300, 300, generator=generator, dtype=torch.float64)
    stack = (base @ base.transpose(1, 2)).cuda()  # [5, 300, 300]
    assert stack.shape[-1] >= spectra.CUDA_STREAMS_MIN_DIM
    on_streams = spectra._eigvalsh(stack)
    torch.testing.assert_close(on_streams, torch.linalg.eigvalsh(stack), rtol=1e-12, atol=1e-9)
