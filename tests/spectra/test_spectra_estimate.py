"""spectra="estimate": SLQ entropy, exact PR, top-k + bulk EEE/JS, against independent float64 NumPy metrics."""

import math

import numpy as np
import pytest
import torch
from reference import activation_metrics, spectrum_reference, two_pass
from trainer_helpers import VOCAB, tiny_gpt2

from nerve_hf import CovarianceAccumulator, spectra
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.spectra.estimate import estimated_metric_values, estimated_metrics
from nerve_hf.spectra.slq import slq_trace

ESTIMATED = ("se_pre", "se_post", "eee_pre", "eee_post", "js")


def ffn_rows(n_inner: int, tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pre/post activation rows [tokens, n_inner] of the last FFN of a tiny GPT-2 (n_embd 24) on random tokens."""
    model = tiny_gpt2(seed, n_inner=n_inner).eval()
    mlp = model.transformer.h[-1].mlp
    got = {"pre": [], "post": []}
    hooks = [
        mlp.c_fc.register_forward_hook(lambda m, i, o: got["pre"].append(o.reshape(-1, o.shape[-1]))),
        mlp.c_proj.register_forward_pre_hook(lambda m, i: got["post"].append(i[0].reshape(-1, i[0].shape[-1]))),
    ]
    ids = torch.randint(1, VOCAB, (tokens // 16, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return tuple(torch.cat(got[side]).double().numpy() for side in ("pre", "post"))


@pytest.fixture(scope="module")
def activations():
    return ffn_rows(61, 640)  # pre: rank ≤ 24 of 61; post: full rank


def test_rows_have_the_exact_paths_keys(activations):
    pre, post = activations
    est = estimated_metrics(two_pass(pre), two_pass(post), top_k=6, probes=8, lanczos_steps=12)
    assert tuple(est.values) == METRIC_NAMES == tuple(est.stderr) == tuple(est.bounds)


@pytest.mark.parametrize("n_inner", [37, 61])
def test_against_float64_reference_on_real_activations(n_inner):
    pre, post = ffn_rows(n_inner, 640)
    ref = activation_metrics(pre, post)  # two-pass covariance, numpy eigvalsh, the paper's formulas
    est = estimated_metrics(two_pass(pre), two_pass(post), top_k=5, probes=16, lanczos_steps=24, seed=0)
    assert est.pre.residual_mass > 0.3 and est.post.residual_mass > 0.3  # most of the spectrum is estimated
    for name in ("pr_pre", "pr_post"):  # exact by the trace identity
        assert est.values[name] == pytest.approx(ref[name], rel=1e-10)
        assert est.stderr[name] == 0.0
    for name in ESTIMATED:
        assert abs(est.values[name] - ref[name]) <= 4 * est.stderr[name], name
        assert 0 < est.stderr[name] < 0.02, name
    for name in METRIC_NAMES:  # the bounds hold for any bulk: the exact value is inside
        low, high = est.bounds[name]
        assert low - 1e-12 <= ref[name] <= high + 1e-12, name


def test_top_k_at_least_the_rank_is_exact():
    pre, post = ffn_rows(37, 16)  # 16 tokens: both covariances of rank ≤ 15 < top_k = 20 < D - 1 (eigsh)
    ref = activation_metrics(pre, post)
    est = estimated_metrics(two_pass(pre), two_pass(post), top_k=20, probes=4, lanczos_steps=8)
    assert est.pre.residual_mass < 1e-12 and est.post.residual_mass < 1e-12
    for name in METRIC_NAMES:
        assert est.values[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name


def test_pre_exact_when_top_k_covers_its_rank(activations):
    pre, post = activations  # pre has rank ≤ n_embd = 24
    ref = activation_metrics(pre, post)
    est = estimated_metrics(two_pass(pre), two_pass(post), top_k=30, probes=8, lanczos_steps=12)
    for name in ("se_pre", "eee_pre"):
        assert est.values[name] == pytest.approx(ref[name], rel=1e-9), name


def test_slq_exact_on_a_diagonal_matrix():
    """Rademacher probes have v_i² = 1, so vᵀ f(A) v = tr f(A) for a diagonal A, and Gauss quadrature with
    as many steps as distinct eigenvalues is exact: the estimate's error and stated error are 0."""
    lam = np.repeat([4.0, 2.5, 1.0, 0.25, 0.0], [3, 5, 9, 11, 1])  # D = 29, 5 distinct values
    rho = lam / lam.sum()
    exact = spectrum_reference(lam)
    a = torch.diag(torch.from_numpy(rho))
    f = lambda x: -np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)  # noqa: E731
    mean, stderr, per_probe, _, _ = slq_trace(lambda x: x @ a, 29, f, probes=6, steps=6, seed=3)
    assert mean == pytest.approx(exact["se"], abs=1e-12) and stderr < 1e-12
    assert np.allclose(per_probe, exact["se"], atol=1e-12)
    # the whole estimate with nothing deflated: SLQ's measure is the exact spectrum, so EEE and JS are exact
    other = np.repeat([3.0, 1.0, 0.5], [2, 13, 14])
    est = estimated_metrics(np.diag(lam), np.diag(other), top_k=0, probes=4, lanczos_steps=6)
    ref_other = spectrum_reference(other)
    assert est.values["se_pre"] == pytest.approx(exact["se"], abs=1e-12)
    assert est.values["eee_pre"] == pytest.approx(exact["eee"], abs=1e-12)
    assert est.values["eee_post"] == pytest.approx(ref_other["eee"], abs=1e-12)
    from scipy.spatial.distance import jensenshannon

    assert est.values["js"] == pytest.approx(jensenshannon(exact["p"], ref_other["p"]) ** 2, abs=1e-12)


def test_slq_variance_formula_and_error_within_standard_errors():
    """Off the diagonal the per-probe estimates are Rademacher quadratic forms of F = f(ρ) (quadrature exact:
    4 distinct eigenvalues, 4 steps): mean tr F, variance 2(‖F‖²_F − Σ F_ii²); the mean of m probes is
    within a few of its standard errors."""
    d = 31
    q, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((d, d)))
    lam = np.repeat([5.0, 2.0, 1.0, 0.5], [4, 7, 9, 11])
    rho = lam / lam.sum()
    f_rho = (q * (-rho * np.log(rho))) @ q.T  # f(ρ) in the rotated basis
    exact = float(np.trace(f_rho))
    variance = 2 * (float((f_rho**2).sum()) - float((np.diag(f_rho) ** 2).sum()))
    a = torch.from_numpy((q * rho) @ q.T)
    f = lambda x: -np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)  # noqa: E731
    mean, stderr, per_probe, _, _ = slq_trace(lambda x: x @ a, d, f, probes=2000, steps=4, seed=0)
    assert per_probe.var(ddof=1) == pytest.approx(variance, rel=0.1)
    assert stderr == pytest.approx(math.sqrt(variance / 2000), rel=0.05)
    assert abs(mean - exact) <= 4 * math.sqrt(variance / 2000)
    for probes in (8, 32):  # the full estimator (control variates included) on the same matrix
        est = estimated_metrics(a, a, top_k=0, probes=probes, lanczos_steps=4, seed=1)
        assert abs(est.values["se_pre"] - exact) <= 4 * est.stderr["se_pre"]


def test_same_seed_same_numbers_other_seed_other_probes(activations):
    pre, post = (two_pass(x) for x in activations)
    options = dict(top_k=5, probes=8, lanczos_steps=12)
    first = estimated_metrics(pre, post, seed=7, **options)
    again = estimated_metrics(torch.from_numpy(pre), torch.from_numpy(post), seed=7, **options)  # torch input too
    other = estimated_metrics(pre, post, seed=8, **options)
    assert first.values == again.values and first.stderr == again.stderr
    assert first.values["se_pre"] != other.values["se_pre"]
    assert first.values["pr_pre"] == other.values["pr_pre"]


def test_undefined_spectra_are_nan(activations):
    pre = two_pass(activations[0])
    zero = np.zeros_like(pre)
    broken = pre.copy()
    broken[0, 0] = np.nan
    for bad in (zero, broken):
        est = estimated_metrics(pre, bad, top_k=5, probes=4, lanczos_steps=8)
        assert all(math.isnan(est.values[name]) for name in ("se_post", "pr_post", "eee_post", "js"))
        assert not math.isnan(est.values["se_pre"]) and est.post is None


def test_drop_in_for_metric_values(activations):
    pre, post = (torch.from_numpy(x) for x in activations)
    pairs = []
    for _ in range(2):
        acc_pre, acc_post = CovarianceAccumulator(pre.shape[1]), CovarianceAccumulator(post.shape[1])
        acc_pre.update(pre)
        acc_post.update(post)
        pairs.append((acc_pre, acc_post))
    exact_values, exact_spectra = spectra.metric_values(pairs, "all")
    narrow_values, narrow_spectra = estimated_metric_values(pairs, min_dim=62)  # D = 61 < min_dim: exact path
    assert narrow_values == exact_values
    assert all(torch.equal(a, b) for x, y in zip(narrow_spectra, exact_spectra) for a, b in zip(x, y))
    values, kept = estimated_metric_values(pairs, min_dim=61, top_k=5, probes=8, lanczos_steps=12)
    direct = estimated_metrics(pairs[0][0].covariance(), pairs[0][1].covariance(), top_k=5, probes=8, lanczos_steps=12)
    assert values[0] == direct.values and tuple(values[0]) == METRIC_NAMES
    for name in METRIC_NAMES:
        assert values[0][name] == pytest.approx(exact_values[0][name], abs=0.05), name
    spectrum = kept[0][0]
    assert spectrum.shape == (61,) and spectrum.dtype == torch.float64
    assert float(spectrum.sum()) == pytest.approx(1.0) and bool((spectrum[:-1] >= spectrum[1:]).all())


# ------------------------------------------------------------------- wired into compute()
def _tracked_wide_gpt2(n_inner: int = 203):
    from trainer_helpers import tiny_gpt2

    from nerve_hf import FFNTracker

    model = tiny_gpt2(n_inner=n_inner).eval()
    ids = torch.randint(1, 50, (6, 16), generator=torch.Generator().manual_seed(3))
    tracker = FFNTracker(model)
    with tracker, torch.no_grad():
        model(ids)
    return tracker


def test_compute_with_spectra_estimate_estimates_wide_ffns_and_keeps_pr_exact(monkeypatch):
    from nerve_hf.spectra import estimate as spectra_estimate

    tracker = _tracked_wide_gpt2()
    exact = tracker.compute()
    assert tracker.compute(spectra="estimate").rows == exact.rows  # 203 < ESTIMATE_MIN_DIM: decomposed exactly
    monkeypatch.setattr(spectra_estimate, "ESTIMATE_MIN_DIM", 100)
    estimated = tracker.compute(spectra="estimate")
    assert tracker.compute(metrics="estimate").rows == estimated.rows
    for got, want in zip(estimated.rows, exact.rows):
        assert got["tokens"] == want["tokens"] == 96
        # PR by the trace identity; the exact path clamps the fp32 round-off negatives of these rank-96 spectra
        assert got["pr_post"] == pytest.approx(want["pr_post"], rel=1e-6)
        assert got["se_post"] != want["se_post"]  # really estimated ...
        for name in ("se_pre", "se_post", "eee_pre", "eee_post"):
            assert got[name] == pytest.approx(want[name], rel=0.02), name  # ... and close
        assert got["js"] == pytest.approx(want["js"], abs=0.01)
    assert estimated.eigenvalues["ffn.0"][1].shape == (203,)
    with pytest.raises(ValueError, match="spectra must be one of"):
        tracker.compute(spectra="approximate")


def test_the_callback_and_the_probe_pass_spectra_on(monkeypatch, tmp_path):
    from trainer_helpers import make_trainer

    from nerve_hf import NerveCallback
    from nerve_hf.probe.measure import probe_model
    from nerve_hf.spectra import estimate as spectra_estimate

    monkeypatch.setattr(spectra_estimate, "ESTIMATE_MIN_DIM", 30)  # the tests' GPT-2 FFNs are 37 wide
    calls = []
    original = spectra_estimate.estimated_metric_values
    monkeypatch.setattr(
        spectra_estimate, "estimated_metric_values", lambda *a, **k: calls.append(k["min_dim"]) or original(*a, **k)
    )
    make_trainer(tmp_path, [NerveCallback(every_n_steps=2, spectra="estimate", flow=False)], max_steps=2).train()
    assert calls and set(calls) == {30}
    calls.clear()
    from trainer_helpers import tiny_gpt2

    probe_model(tiny_gpt2(), [{"input_ids": torch.randint(1, 50, (2, 9))}], spectra="estimate", flow=False)
    assert calls == [30]
