"""NerveCallback with flow, position buckets and adjacent cross-layer coherence: the keys reach the Trainer's
logs and nerve_metrics.jsonl, equal to a tracker run by hand on the same micro-batches before the update
(whose values tests/test_coherence.py checks against float64 NumPy), and `nerve report` still reads the run."""

import math

import numpy as np
import pytest
import torch
from test_callback import CaptureStep
from trainer_helpers import make_trainer, tiny_gpt2

from nerve_hf import FFNTracker, NerveCallback
from nerve_hf.sinks.archive import load_position_spectra
from nerve_hf.sinks.records import read_records
from nerve_hf.tracking.measurements.flow import FLOW_KEYS

OPTIONS = dict(flow=True, position_buckets=[0, 4], cross_layer="adjacent")


def test_callback_logs_and_records_flow_positions_and_cross_layer(tmp_path):
    capture = CaptureStep(step=4)
    trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=2, **OPTIONS), capture])
    trainer.train()

    model = tiny_gpt2()
    model.load_state_dict(capture.weights)
    model.train()
    tracker = FFNTracker(model, **OPTIONS)
    with tracker, torch.no_grad():
        for inputs in capture.inputs:
            model(**inputs)
    report = tracker.compute()
    expected = report.to_log_dict()
    logged = next(e for e in trainer.state.log_history if e["step"] == 4 and "nerve/mean/se_pre" in e)
    for key in (
        "nerve/ffn.0/se_input",
        "nerve/mean/js_post_output",
        "nerve/mean/pr_pre.pos0-4",
        "nerve/ffn.1/js.pos4-inf",
        "nerve/ffn.0/cka_next",
        "nerve/ffn.0/js_post_next",
        "nerve/mean/cka_next",
    ):
        assert key in expected
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert "nerve/ffn.1/cka_next" not in logged  # the last layer has no next one
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert all(math.isfinite(e["eval_nerve/ffn.0/cka_next"]) for e in evals)

    records = read_records(tmp_path / "nerve_metrics.jsonl")
    record = next(r for r in records if r["step"] == 4 and r["split"] == "train" and r["site"] == "ffn.0")
    assert set(FLOW_KEYS) <= set(record) and record["cka_next"] == pytest.approx(expected["nerve/ffn.0/cka_next"])
    assert [(b["bucket"], b["tokens"]) for b in record["positions"]] == [("0-4", 2 * 2 * 4), ("4-inf", 2 * 2 * 5)]

    archived = load_position_spectra(tmp_path)  # every bucket's spectra, beside the sites'
    at_4 = archived[(archived.split == "train") & (archived.step == 4)]
    assert [(row.site, row.bucket) for row in at_4.itertuples()] == list(report.position_eigenvalues)
    for row in at_4.itertuples():
        for got, want in zip((row.pre, row.post), report.position_eigenvalues[(row.site, row.bucket)]):
            assert np.allclose(got, want.numpy(), rtol=1e-5, atol=1e-6 * float(want[0]))  # float32 storage

    from nerve_hf.analysis.runs import load_run

    trainer.save_state()
    run = load_run(tmp_path)  # the readers of the records ignore the new keys
    assert set(run.metrics["site"]) >= {"ffn.0", "ffn.1"}


def test_the_callback_measures_the_flow_by_default_and_flow_false_leaves_it_out(tmp_path):
    on = make_trainer(tmp_path / "on", [NerveCallback(every_n_steps=2)], max_steps=2)
    on.train()
    off = make_trainer(tmp_path / "off", [NerveCallback(every_n_steps=2, flow=False)], max_steps=2)
    off.train()
    logged_on = next(e for e in on.state.log_history if "nerve/mean/se_pre" in e)
    logged_off = next(e for e in off.state.log_history if "nerve/mean/se_pre" in e)
    assert 1.0 <= logged_on["nerve/mean/pr_input"] <= 24 and 0 <= logged_on["nerve/mean/js_post_output"] <= math.log(2)
    assert not any("input" in key or "output" in key for key in logged_off)
    assert logged_on["nerve/mean/se_pre"] == pytest.approx(logged_off["nerve/mean/se_pre"], rel=1e-12)
