"""Spectral metrics against closed forms and an independent float64 NumPy/SciPy implementation."""

import math
import warnings

import numpy as np
import pytest
import torch
from reference import spectrum_reference
from scipy.spatial.distance import jensenshannon

from nerve_hf import metrics


@pytest.mark.parametrize("d", [1, 2, 7, 64, 301])
def test_uniform_spectrum(d):
    lam = torch.full((d,), 3.5)
    assert metrics.spectral_entropy(lam).item() == pytest.approx(math.log(d), abs=1e-12)
    assert metrics.participation_ratio(lam).item() == pytest.approx(d, rel=1e-12)
    assert metrics.early_enrichment(lam).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("d", [1, 3, 50, 257])
def test_one_hot_spectrum(d):
    lam = torch.zeros(d, dtype=torch.float64)
    lam[d // 2] = 2.0  # position does not matter: metrics sort first
    assert metrics.spectral_entropy(lam).item() == 0.0
    assert metrics.participation_ratio(lam).item() == 1.0
    assert metrics.early_enrichment(lam).item() == pytest.approx((d - 1) / d, abs=1e-12)


def test_js_closed_forms():
    p = torch.tensor([4.0, 2.0, 1.0])
    assert metrics.js_divergence(p, p.flip(0)).item() == pytest.approx(0.0, abs=1e-15)
    # Disjoint supports after sorting are impossible (both put mass first), so compare the
    # normalised distributions directly through the private helper for the ln 2 bound.
    a = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    assert metrics._jensen_shannon(a, b).item() == pytest.approx(math.log(2), abs=1e-15)


@pytest.mark.parametrize("d", [1, 2, 5, 33, 128, 300])
def test_against_spectrum_reference(d):
    rng = np.random.default_rng(d)
    pre = rng.exponential(size=d) ** 3
    post = rng.exponential(size=d)
    pre[rng.random(d) < 0.2] = 0.0  # exact zeros
    pre[0] = max(pre[0], 1e-3)
    rng.shuffle(pre)
    got = metrics.spectrum_metrics(torch.from_numpy(pre), torch.from_numpy(post).float())
    ref_pre, ref_post = spectrum_reference(pre), spectrum_reference(post.astype(np.float32))
    assert got["se_pre"].item() == pytest.approx(ref_pre["se"], rel=1e-12, abs=1e-14)
    assert got["se_post"].item() == pytest.approx(ref_post["se"], rel=1e-12, abs=1e-14)
    assert got["pr_pre"].item() == pytest.approx(ref_pre["pr"], rel=1e-12)
    assert got["pr_post"].item() == pytest.approx(ref_post["pr"], rel=1e-12)
    assert got["eee_pre"].item() == pytest.approx(ref_pre["eee"], rel=1e-10, abs=1e-14)
    assert got["eee_post"].item() == pytest.approx(ref_post["eee"], rel=1e-10, abs=1e-14)
    ref_js = jensenshannon(ref_pre["p"], ref_post["p"]) ** 2  # SciPy returns the distance, natural log
    assert got["js"].item() == pytest.approx(ref_js, rel=1e-9, abs=1e-14)
    for name, value in got.items():
        assert value.dtype == torch.float64, name


def test_batched_equals_one_by_one_and_order_free():
    torch.manual_seed(0)
    pre = torch.rand(3, 4, 17) ** 4
    post = torch.rand(3, 4, 17)
    batched = metrics.spectrum_metrics(pre, post)
    shuffled = metrics.spectrum_metrics(pre[..., torch.randperm(17)], post.flip(-1))
    for name in metrics.METRIC_NAMES:
        assert batched[name].shape == (3, 4)
        torch.testing.assert_close(batched[name], shuffled[name], rtol=1e-12, atol=1e-14)
        one = metrics.spectrum_metrics(pre[2, 1], post[2, 1])[name]
        torch.testing.assert_close(batched[name][2, 1], one, rtol=1e-12, atol=1e-14)


def test_ranges_on_random_spectra():
    torch.manual_seed(1)
    for d in (2, 9, 100):
        lam = torch.rand(200, d, dtype=torch.float64) ** 6
        functions = (metrics.spectral_entropy, metrics.participation_ratio, metrics.early_enrichment)
        se, pr, eee = (f(lam) for f in functions)
        js = metrics.js_divergence(lam, torch.rand(200, d))
        assert ((se >= 0) & (se <= math.log(d) + 1e-12)).all()
        assert ((pr >= 1 - 1e-12) & (pr <= d + 1e-9)).all()
        assert ((eee >= -1e-12) & (eee < 1)).all()
        assert ((js >= 0) & (js <= math.log(2))).all()


def test_negative_round_off_is_clamped():
    lam = torch.tensor([2.0, 1.0, -1e-17, -3e-18], dtype=torch.float64)
    clean = torch.tensor([2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    for f in (metrics.spectral_entropy, metrics.participation_ratio, metrics.early_enrichment):
        assert f(lam).item() == f(clean).item()


def test_zero_variance_gives_nan_not_error():
    zero = torch.zeros(2, 5)
    live = torch.rand(2, 5) + 0.1
    zero_and_live = torch.stack([torch.zeros(5), torch.ones(5)])
    out = metrics.spectrum_metrics(zero, live)
    for name in ("se_pre", "pr_pre", "eee_pre", "js"):
        assert torch.isnan(out[name]).all(), name
    for name in ("se_post", "pr_post", "eee_post"):
        assert torch.isfinite(out[name]).all(), name
    mixed = metrics.participation_ratio(zero_and_live)
    assert torch.isnan(mixed[0]) and mixed[1].item() == pytest.approx(5.0)
    assert torch.isnan(metrics.spectral_entropy(torch.tensor([float("nan"), 1.0])))


def test_bad_shapes_raise_clearly():
    with pytest.raises(ValueError, match="same length D"):
        metrics.js_divergence(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="last dimension"):
        metrics.spectral_entropy(torch.tensor(1.0))
    with pytest.raises(ValueError, match="D = 0"):
        metrics.participation_ratio(torch.ones(2, 0))


# ----------------------------------------------------------- non-finite and negative eigenvalues
CLEAN_PRE = np.array([[3.0, 1.0, 0.5, 0.25, 0.0], [2.0, 2.0, 1.0, 0.1, 0.01], [5.0, 0.5, 0.5, 0.2, 0.1]])
CLEAN_POST = np.array([[1.0, 1.0, 1.0, 0.5, 0.5], [4.0, 1.0, 0.3, 0.2, 0.0], [2.0, 1.5, 1.0, 0.5, 0.25]])


def reference_rows(pre: np.ndarray, post: np.ndarray) -> dict[str, list[float]]:
    """The seven metrics of each row pair, from the NumPy/SciPy reference."""
    out = {name: [] for name in metrics.METRIC_NAMES}
    for a, b in zip(pre, post):
        ref_a, ref_b = spectrum_reference(a), spectrum_reference(b)
        for side, ref in (("pre", ref_a), ("post", ref_b)):
            for metric in ("se", "pr", "eee"):
                out[f"{metric}_{side}"].append(ref[metric])
        out["js"].append(jensenshannon(ref_a["p"], ref_b["p"]) ** 2)
    return out


@pytest.mark.parametrize("bad", [-math.inf, math.inf, math.nan])
@pytest.mark.parametrize("side", ["pre", "post"])
def test_nonfinite_eigenvalue_makes_only_its_row_nan(bad, side):
    pre, post = CLEAN_PRE.copy(), CLEAN_POST.copy()
    (pre if side == "pre" else post)[1, 2] = bad  # row 1 of one side only
    ref = reference_rows(CLEAN_PRE, CLEAN_POST)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # non-finite is NaN, not a warning
        got = metrics.spectrum_metrics(torch.from_numpy(pre), torch.from_numpy(post))
        single = {
            "se": metrics.spectral_entropy(torch.from_numpy(pre if side == "pre" else post)),
            "pr": metrics.participation_ratio(torch.from_numpy(pre if side == "pre" else post)),
            "eee": metrics.early_enrichment(torch.from_numpy(pre if side == "pre" else post)),
            "js": metrics.js_divergence(torch.from_numpy(pre), torch.from_numpy(post)),
            "p": metrics.normalized_spectrum(torch.from_numpy(pre if side == "pre" else post)),
        }
    for name in metrics.METRIC_NAMES:
        values = got[name].tolist()
        affected = name == "js" or name.endswith(side)
        if affected:
            assert math.isnan(values[1]), name
        for row in (0, 2) if affected else (0, 1, 2):
            assert values[row] == pytest.approx(ref[name][row], rel=1e-12, abs=1e-15), (name, row)
    for metric in ("se", "pr", "eee", "js"):
        key = "js" if metric == "js" else f"{metric}_{side}"
        torch.testing.assert_close(single[metric], got[key], rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(single["p"][1]).all() and torch.isfinite(single["p"][[0, 2]]).all()


def test_nonfinite_eigenvalue_in_a_single_spectrum():
    for bad in (-math.inf, math.inf, math.nan):
        lam = torch.tensor([2.0, 1.0, bad])
        p = metrics.normalized_spectrum(lam)
        assert p.shape == (3,) and torch.isnan(p).all()
        for f in (metrics.spectral_entropy, metrics.participation_ratio, metrics.early_enrichment):
            assert torch.isnan(f(lam)), (f.__name__, bad)
        assert torch.isnan(metrics.js_divergence(torch.ones(3), lam))


def test_round_off_negative_is_silent_and_equals_zero():
    clean = torch.from_numpy(CLEAN_PRE)
    noisy = clean.clone()
    noisy[:, -1] = -1e-15 * clean.abs().amax(-1)  # within 100·D·eps·max|λ| = 1.1e-13 of the scale
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = metrics.spectrum_metrics(noisy, torch.from_numpy(CLEAN_POST))
        zeroed = clean.clone().index_fill_(-1, torch.tensor([4]), 0.0)
        want = metrics.spectrum_metrics(zeroed, torch.from_numpy(CLEAN_POST))
        for name in metrics.METRIC_NAMES:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
        # float32 eigenvalues get float32's round-off: 100·3·eps32 = 3.6e-5 relative
        assert metrics.participation_ratio(torch.tensor([2.0, 1.0, -2e-6])).item() == pytest.approx(1.8)


def test_clearly_negative_eigenvalue_warns_once_then_is_clamped():
    clean = torch.from_numpy(CLEAN_PRE)
    noisy = clean.clone()
    noisy[0, -1] = -1e-3 * 3.0
    noisy[2, -1] = -2e-3 * 5.0  # two rows, one call: one warning naming the worst
    zeroed = noisy.clamp_min(0.0)
    post = torch.from_numpy(CLEAN_POST)
    with pytest.warns(RuntimeWarning, match="negative") as record:
        got = metrics.spectrum_metrics(noisy, noisy.flip(0))  # pre and post both: still one warning
    assert len(record) == 1
    assert "-2.0e-03" in str(record[0].message)
    want = metrics.spectrum_metrics(zeroed, zeroed.flip(0))
    for name in metrics.METRIC_NAMES:
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    for f in (
        metrics.spectral_entropy,
        metrics.participation_ratio,
        metrics.early_enrichment,
        metrics.normalized_spectrum,
    ):
        with pytest.warns(RuntimeWarning, match="negative") as record:
            torch.testing.assert_close(f(noisy), f(zeroed), rtol=0, atol=0)
        assert len(record) == 1, f.__name__
    with pytest.warns(RuntimeWarning, match="negative") as record:
        js = metrics.js_divergence(post, noisy)
    assert len(record) == 1
    torch.testing.assert_close(js, metrics.js_divergence(post, zeroed), rtol=0, atol=0)
    # float64 eigenvalues of an fp32-accumulated covariance: float32's round-off still excuses -2e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.participation_ratio(torch.tensor([2.0, 1.0, -2e-6], dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="negative"):
        metrics.participation_ratio(torch.tensor([2.0, 1.0, -2e-3], dtype=torch.float64))
