"""Summaries beyond the paper against independent float64 computations, the corrected PR's bias on a case
where the truth is known, and the extras in a Trainer run's records."""

import math

import numpy as np
import pytest
import torch
from reference import spectrum_reference
from trainer_helpers import make_trainer, tiny_gpt2

from nerve_hf import FFNTracker, NerveCallback
from nerve_hf import extra_metrics as summaries
from nerve_hf.sinks.records import read_records
from nerve_hf.stats.covariance import CovarianceAccumulator

SPECTRA = np.array([[5.0, 3.0, 1.0, 0.5, 0.25, 0.0, 0.0], [2.0, 2.0, 2.0, 1.0, 1.0, 0.1, 0.01]])


def test_effective_and_stable_rank_and_alpha_against_numpy():
    lam = torch.from_numpy(SPECTRA)
    for row, (erank, srank, alpha) in zip(
        SPECTRA, zip(summaries.effective_rank(lam), summaries.stable_rank(lam), summaries.alpha_exponent(lam))
    ):
        ref = spectrum_reference(row)
        assert float(erank) == pytest.approx(math.exp(ref["se"]), rel=1e-12)
        assert float(srank) == pytest.approx(row.sum() / row.max(), rel=1e-12)
        keep = ref["p"] > 1e-6 * ref["p"][0]
        slope = np.polyfit(np.log(np.arange(1, len(row) + 1)[keep]), np.log(ref["p"][keep]), 1)[0]
        assert float(alpha) == pytest.approx(-slope, rel=1e-10)
    power_law = 1.0 / torch.arange(1, 40, dtype=torch.float64) ** 1.7
    assert float(summaries.alpha_exponent(power_law)) == pytest.approx(1.7, rel=1e-10)
    assert math.isnan(float(summaries.alpha_exponent(torch.tensor([1.0, 0.0, 0.0]))))  # fewer than 3 ranks
    assert torch.isnan(summaries.stable_rank(torch.tensor([1.0, float("-inf")])))  # non-finite: NaN


def test_corrected_pr_removes_the_finite_sample_bias_of_an_isotropic_covariance():
    """Σ = I with D = 40 from n = 60 Gaussian rows: the true PR is 40; the plain sample PR averages about
    D / (1 + D / n) = 24, the corrected one within 3% of 40."""
    generator = torch.Generator().manual_seed(0)
    plain, corrected = [], []
    for _ in range(200):
        acc = CovarianceAccumulator(40)
        acc.update(torch.randn(60, 40, dtype=torch.float64, generator=generator))
        lam = acc.eigenvalues()
        plain.append(float((lam.sum() ** 2) / (lam**2).sum()))
        corrected.append(float(summaries.corrected_participation_ratio(lam, acc.count)))
    assert np.mean(plain) == pytest.approx(40 / (1 + 40 / 60), rel=0.05)
    assert np.mean(corrected) == pytest.approx(40.0, rel=0.03)
    assert abs(np.mean(corrected) - 40) < abs(np.mean(plain) - 40) / 10
    assert math.isnan(float(summaries.corrected_participation_ratio(torch.ones(3), 2)))  # n < 3


def test_extra_metrics_reach_the_tracker_rows_and_the_records(tmp_path):
    model = tiny_gpt2()
    tracker = FFNTracker(model)
    with tracker, torch.no_grad():
        model(input_ids=torch.randint(1, 61, (3, 9), generator=torch.Generator().manual_seed(2)))
    report = tracker.compute(extra_metrics=True)
    for row in report.rows:
        pre, post = report.eigenvalues[row["site"]]
        assert row["erank_pre"] == pytest.approx(math.exp(row["se_pre"]), rel=1e-12)
        assert row["srank_post"] == pytest.approx(float(post.clamp_min(0).sum() / post.max()), rel=1e-12)
        assert row["prc_pre"] == pytest.approx(float(summaries.corrected_participation_ratio(pre, 27)), rel=1e-12)
    assert list(report.to_pandas().columns[-8:]) == list(summaries.EXTRA_METRIC_NAMES)
    assert "erank_pre" not in tracker.compute().rows[0]  # off by default

    trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=2, extra_metrics=True)], max_steps=2)
    trainer.train()
    records = list(read_records(tmp_path / "nerve_metrics.jsonl"))
    assert all(math.isfinite(r["alpha_post"]) and r["erank_pre"] >= 1 for r in records)
    logged = [key for entry in trainer.state.log_history for key in entry if "erank" in key]
    assert logged == []  # the Trainer's keys stay the seven paper metrics
