"""Large-model features and the CPU fast path of the accumulator, on tiny inputs with real values."""

import warnings

import numpy as np
import pytest
import torch
from reference import rel_err, two_pass

import nerve_hf.stats.kernels as kernels
from nerve_hf.stats.covariance import CovarianceAccumulator


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Force the CPU path to centre/multiply in many small row chunks and merge in row blocks."""
    monkeypatch.setattr(kernels, "_CPU_CHUNK_ELEMENTS", 37 * 7)  # 7 rows of width 37 per chunk
    monkeypatch.setattr(kernels, "_MIN_CHUNK_ROWS", 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_chunked_cpu_path_matches_two_pass_with_large_offset(tiny_chunks, dtype):
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(37, 37, generator=generator)
    # bf16 keeps 8 bits: an offset of 1e4 would round every value alike, so it gets a smaller one.
    offset, spread = (1e4, 1e-2) if dtype != torch.bfloat16 else (50.0, 1.0)
    rows = offset + spread * torch.randn(1000, 37, generator=generator) @ mixing
    # Sorted along the batch so neighbouring rows are not representative of the mean.
    rows = rows[rows[:, 0].argsort()].to(dtype)  # [N, 37]
    acc = CovarianceAccumulator(37)
    for chunk in rows.split(333):  # 333 rows: 48 row chunks of 7 each, an uneven last one
        acc.update(chunk)
    # float64: the round-off of values near 1e4 (ulp 2e-12) against a spread of 1e-2
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-6, torch.bfloat16: 1e-5}[dtype]
    assert acc.count == 1000
    assert rel_err(acc.covariance(), two_pass(rows)) < tolerance
    np.testing.assert_allclose(acc.mean().numpy(), rows.double().mean(0).numpy(), rtol=1e-12)


def test_chunked_cpu_path_equals_one_chunk(tiny_chunks, monkeypatch):
    torch.manual_seed(1)
    rows = torch.randn(500, 37) * torch.linspace(0.1, 3, 37) + 2
    chunked = CovarianceAccumulator(37)
    chunked.update(rows)
    monkeypatch.setattr(kernels, "_CPU_CHUNK_ELEMENTS", 1 << 30)
    whole = CovarianceAccumulator(37)
    whole.update(rows)
    reference = two_pass(rows)
    assert rel_err(chunked.covariance(), reference) < 1e-6
    assert rel_err(chunked.covariance(), whole.covariance().numpy()) < 1e-6  # fp32 GEMM round-off only
    torch.testing.assert_close(chunked.mean(), whole.mean(), rtol=1e-7, atol=0)  # fp32 sums of x − s


def test_chunked_cpu_path_skips_nonfinite_in_a_late_chunk(tiny_chunks):
    torch.manual_seed(2)
    rows = torch.randn(200, 37) + 3
    rows[180, 4] = float("nan")  # in the 26th of 29 chunks
    rows[191, 0] = float("inf")
    acc = CovarianceAccumulator(37)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc.update(rows)
    assert any("skipped 2 of 200" in str(w.message) for w in caught)
    good = torch.isfinite(rows).all(1)
    assert acc.count == 198 and acc.skipped == 2
    assert rel_err(acc.covariance(), two_pass(rows[good])) < 1e-6


def test_update_leaves_its_input_untouched(tiny_chunks):
    torch.manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        rows = (torch.randn(100, 37) + 5).to(dtype)
        before = rows.clone()
        CovarianceAccumulator(37).update(rows)
        assert torch.equal(rows, before)


# ----------------------------------------------------------------------------- tracker: large-model options
from trainer_helpers import VOCAB, make_trainer, tiny_gpt2_config  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

from nerve_hf import NerveCallback  # noqa: E402
from nerve_hf.metrics import METRIC_NAMES  # noqa: E402
from nerve_hf.sinks.records import RECORDS_FILENAME, read_records  # noqa: E402
from nerve_hf.tracking.tracker import FFNTracker, MemoryBudgetError, covariance_state_bytes  # noqa: E402


def gpt2(n_layer=3, n_inner=37, activation="gelu_new", seed=0, device=None) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = tiny_gpt2_config(n_positions=32, n_layer=n_layer, n_inner=n_inner, activation_function=activation)
    if device == "meta":
        with torch.device("meta"):
            return GPT2LMHeadModel(config).eval()
    return GPT2LMHeadModel(config).eval()


def padded_batch(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def test_token_cap_gives_pre_and_post_the_same_tokens():
    # With an identity activation post == pre row for row, so the two spectra agree (to GEMM round-off:
    # MKL is not bitwise reproducible across buffers) only when both sides kept the same tokens; the cap
    # (45) falls inside the second batch and pads are skipped.
    model = gpt2(n_layer=2, activation="linear")
    batches = [padded_batch([11, 7, 13], seed=1), padded_batch([9, 12, 4], seed=2), padded_batch([8], seed=3)]
    captured = []
    handle = model.transformer.h[1].mlp.c_fc.register_forward_hook(
        lambda module, args, out: captured.append(out.detach().double())
    )
    tracker = FFNTracker(model, max_tokens=45, flow=False)
    with tracker, torch.no_grad():
        for inputs in batches:
            model(**inputs)
    handle.remove()
    report = tracker.compute()
    for row in report.rows:
        eig_pre, eig_post = report.eigenvalues[row["site"]]
        assert row["tokens"] == 45
        torch.testing.assert_close(eig_pre, eig_post, rtol=1e-9, atol=1e-12)
        assert row["js"] == pytest.approx(0.0, abs=1e-9)
    # ... and they are the first 45 real tokens in row-major order (pads never counted).
    real = torch.cat([out[inputs["attention_mask"].bool()] for out, inputs in zip(captured, batches)])  # [N, 37]
    expected = np.sort(np.linalg.eigvalsh(two_pass(real[:45])))[::-1]
    np.testing.assert_allclose(report.eigenvalues["ffn.1"][0].numpy(), expected, rtol=1e-5, atol=1e-6 * expected[0])
    assert not np.allclose(np.linalg.eigvalsh(two_pass(real[:45])), np.linalg.eigvalsh(two_pass(real[5:50])))


def test_pr_fast_path_equals_eigendecomposition_and_skips_it(monkeypatch):
    model = gpt2()
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(**padded_batch([20, 17, 25], seed=4))
    full = tracker.compute()

    def no_eigendecomposition(*args, **kwargs):
        raise AssertionError("compute(metrics='pr') must not eigendecompose")

    monkeypatch.setattr(torch.linalg, "eigvalsh", no_eigendecomposition)
    fast = tracker.compute(metrics="pr")
    assert fast.eigenvalues == {}
    for quick, slow in zip(fast.rows, full.rows):
        assert quick["tokens"] == slow["tokens"] == 62
        for side in ("pr_pre", "pr_post"):
            assert 1.0 < quick[side] < 37.0
            # eigenvalue metrics clamp the round-off negatives of this rank-deficient Σ; the trace keeps them
            assert quick[side] == pytest.approx(slow[side], rel=1e-6)
        assert all(np.isnan(quick[name]) for name in METRIC_NAMES if not name.startswith("pr_"))
    with pytest.raises(ValueError, match="metrics must be one of"):
        tracker.compute(metrics="se")


def test_memory_budget_refuses_with_the_numbers_before_allocating():
    model = gpt2(n_layer=2)
    needed = covariance_state_bytes([37, 37])  # 2 FFNs x 2 sides x (37^2 + 37) x 8 bytes
    assert needed == 2 * 2 * (37 * 37 + 37) * 8
    with pytest.raises(MemoryBudgetError, match=r"2 FFNs of width 37 needs 0\.0429 MiB.*memory_budget_mb=0\.04"):
        FFNTracker(model, memory_budget_mb=0.04, flow=False)
    assert issubclass(MemoryBudgetError, ValueError)
    FFNTracker(model, memory_budget_mb=0.05, flow=False)  # fits
    FFNTracker(model, layers=[0], memory_budget_mb=0.025, flow=False)  # one FFN fits a smaller budget
    with pytest.raises(ValueError, match="positive"):
        FFNTracker(model, memory_budget_mb=0, flow=False)


def test_memory_budget_for_a_llama_70b_sized_model_built_on_meta():
    # 80 FFNs of width 28672 would need 2 x 28672^2 x 8 bytes each, ~0.96 TiB; nothing is allocated.
    model = gpt2(n_layer=80, n_inner=28672, device="meta")
    with pytest.raises(MemoryBudgetError) as error:
        FFNTracker(model, memory_budget_mb=80 * 1024, flow=False)
    message = str(error.value)
    assert "80 FFNs of width 28672" in message and "needs 1,003,555 MiB" in message and "layers_per_step" in message
    assert FFNTracker(model, layers=[0, 1, 2, 3], memory_budget_mb=80 * 1024, flow=False).sites[-1].site == "ffn.3"


def test_callback_memory_budget_raises_at_trainer_construction(tmp_path):
    with pytest.raises(MemoryBudgetError, match="memory_budget_mb"):
        make_trainer(tmp_path, [NerveCallback(every_n_steps=1, memory_budget_mb=0.01)])
    # One block per measurement fits where all of them do not (tiny_gpt2: 2 FFNs of width 37, pre and post
    # only: 2 x (37² + 37) x 8 B = 0.0215 MiB each; the flow's d = 24 stages would add 0.0092 MiB).
    trainer = make_trainer(
        tmp_path, [NerveCallback(every_n_steps=1, memory_budget_mb=0.03, layers_per_step=1, flow=False)], max_steps=2
    )
    trainer.train()
    assert any("nerve/ffn.1/pr_pre" in record for record in trainer.state.log_history)


def _nerve_logs(trainer, prefix="nerve/"):
    """step -> {key: value} of the nerve keys logged at that step (training or evaluation)."""
    out = {}
    for record in trainer.state.log_history:
        keys = {k: v for k, v in record.items() if k.startswith(prefix)}
        if keys:
            out.setdefault(record["step"], {}).update(keys)
    return out


def test_round_robin_cycles_groups_deterministically_with_the_full_runs_values(tmp_path):
    common = dict(max_steps=4, logging_steps=1, eval_steps=2, n_train=32)
    full = make_trainer(tmp_path / "full", [NerveCallback(every_n_steps=1)], model=gpt2(n_layer=3), **common)
    full.train()
    robin = make_trainer(
        tmp_path / "robin", [NerveCallback(every_n_steps=1, layers_per_step=2)], model=gpt2(n_layer=3), **common
    )
    robin.train()
    want, got = _nerve_logs(full), _nerve_logs(robin)
    groups = {1: ["ffn.0", "ffn.1"], 2: ["ffn.2"], 3: ["ffn.0", "ffn.1"], 4: ["ffn.2"]}
    assert sorted(got) == [1, 2, 3, 4]
    for step, sites in groups.items():
        assert sorted({key.split("/")[1] for key in got[step]}) == sites  # no nerve/mean under round-robin
        for key, value in got[step].items():  # the same micro-batches as the full run measured
            assert value == pytest.approx(want[step][key], rel=1e-6, nan_ok=True), (step, key)
    # Evaluations (steps 2 and 4) go round the groups too, and agree with the full run.
    want_eval, got_eval = _nerve_logs(full, "eval_nerve/"), _nerve_logs(robin, "eval_nerve/")
    assert {step: sorted({k.split("/")[1] for k in keys}) for step, keys in got_eval.items()} == {
        2: ["ffn.0", "ffn.1"],
        4: ["ffn.2"],
    }
    for step, keys in got_eval.items():
        for key, value in keys.items():
            assert value == pytest.approx(want_eval[step][key], rel=1e-6), (step, key)
    records = list(read_records(tmp_path / "robin" / RECORDS_FILENAME))
    assert [(r["step"], r["site"]) for r in records if r["split"] == "train"][:3] == [
        (1, "ffn.0"),
        (1, "ffn.1"),
        (2, "ffn.2"),
    ]


def test_callback_pr_only_logs_pr_keys_equal_to_the_full_computation(tmp_path):
    full = make_trainer(tmp_path / "a", [NerveCallback(every_n_steps=2)], max_steps=4)
    full.train()
    fast = make_trainer(tmp_path / "b", [NerveCallback(every_n_steps=2, metrics="pr")], max_steps=4)
    fast.train()
    want, got = _nerve_logs(full), _nerve_logs(fast)
    assert sorted(got) == [2, 4]
    for step, keys in got.items():
        # PR of every stage by the trace identity (the flow's input and output included), nothing else
        assert keys and all(key.endswith(("/pr_pre", "/pr_post", "/pr_input", "/pr_output")) for key in keys)
        assert {"nerve/mean/pr_post", "nerve/mean/pr_input"} <= set(keys)
        for key, value in keys.items():
            assert value == pytest.approx(want[step][key], rel=1e-6)


def test_config_validation_of_the_new_options():
    from nerve_hf.integrations.callback import NerveConfig

    with pytest.raises(ValueError, match="layers_per_step"):
        NerveConfig(layers_per_step=0)
    with pytest.raises(ValueError, match="log_per_site"):
        NerveConfig(layers_per_step=2, log_per_site=False)
    with pytest.raises(ValueError, match="metrics"):
        NerveConfig(metrics="eigen")


def test_compute_decomposes_in_bounded_batches_with_the_same_result(monkeypatch):
    import nerve_hf.spectra as spectra_module
    import nerve_hf.spectra.exact as exact_spectra  # where eigen_batches reads EIGEN_BATCH_BYTES

    model = gpt2(n_layer=3)
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(**padded_batch([30, 21], seed=5))
    together = tracker.compute()
    accs = [acc for state in tracker._states for acc in (state.pre, state.post)]
    assert [len(b) for b in list(spectra_module.eigen_batches(accs))] == [6]
    monkeypatch.setattr(exact_spectra, "EIGEN_BATCH_BYTES", 2 * 37 * 37 * 8)  # two matrices at a time
    assert [len(b) for b in list(spectra_module.eigen_batches(accs))] == [2, 2, 2]
    monkeypatch.setattr(exact_spectra, "EIGEN_BATCH_BYTES", 1)  # smaller than one matrix: one at a time
    assert [len(b) for b in list(spectra_module.eigen_batches(accs))] == [1] * 6
    apart = tracker.compute()
    for a, b in zip(together.rows, apart.rows):
        for name in METRIC_NAMES:
            assert a[name] == pytest.approx(b[name], rel=1e-10, abs=1e-12)
