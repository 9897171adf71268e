"""A Trainer run on a tiny Mixtral: the spectra archive keeps every expert's spectra, and `nerve report` draws
the expert x layer heatmaps and the per-layer summaries over training from the run's records."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import transformers as tf

from nerve_hf import NerveCallback
from nerve_hf.analysis import expert_plots
from nerve_hf.analysis.report import write_report
from nerve_hf.sinks.archive import load_spectra
from tests.integrations.test_experts_callback import _data
from tests.tracking.test_experts import _build


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("moe_run")
    args = tf.TrainingArguments(
        str(run), per_device_train_batch_size=2, max_steps=4, logging_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", learning_rate=1e-2,
    )  # fmt: skip
    trainer = tf.Trainer(
        model=_build("mixtral").train(), args=args, train_dataset=_data(), callbacks=[NerveCallback(every_n_steps=1)]
    )
    trainer.train()
    trainer.save_state()
    records = [json.loads(line) for line in open(run / "nerve_metrics.jsonl")]
    return run, records, trainer.state.log_history


def _pr(eigenvalues) -> float:
    values = np.asarray(eigenvalues, dtype=np.float64)
    return float(values.sum() ** 2 / (values**2).sum())


def test_archive_keeps_every_experts_spectra(moe_run):
    run, records, _ = moe_run
    spectra = load_spectra(run)
    assert sorted(set(spectra["step"])) == [1, 2, 3, 4]
    assert len(spectra) == 4 * 2 * 4  # steps x layers x experts
    by_key = {(row.step, row.site): row for row in spectra.itertuples()}
    for record in records:
        row = by_key[(record["step"], record["site"])]
        assert row.site == f"experts[{record['expert']}].{record['layer']}"
        assert len(row.pre) == len(row.post) == record["dim"] == 48
        if record["pr_pre"] is not None:  # PR from the archived (float32) spectra: the record's PR
            assert _pr(row.pre) == pytest.approx(record["pr_pre"], rel=1e-5)
            assert _pr(row.post) == pytest.approx(record["pr_post"], rel=1e-5)


def test_report_draws_expert_heatmaps_and_summaries(moe_run, tmp_path):
    run, records, history = moe_run
    result = write_report(run, tmp_path / "report")
    names = {path.name for path in result.files}
    assert {"experts_train.png", "expert_summaries_train.png"} <= names
    for name in ("experts_train.png", "expert_summaries_train.png"):
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last = [r for r in records if r["step"] == 4]
    layers, experts, matrix = expert_plots.expert_matrix(last, "pr_gain")
    assert (layers, experts, matrix.shape) == ([0, 1], [0, 1, 2, 3], (4, 2))
    for r in last:
        want = r["pr_post"] / r["pr_pre"] if r["pr_pre"] is not None else math.nan  # None: under 2 tokens
        assert matrix[r["expert"], r["layer"]] == pytest.approx(want, nan_ok=True)
    assert expert_plots.expert_matrix(last, "tokens")[2].sum(axis=0).tolist() == [
        sum(r["tokens"] for r in last if r["layer"] == layer) for layer in (0, 1)
    ]
    # the summaries over training are the Trainer's logged per-layer keys, step by step
    summaries = expert_plots.layer_summaries(records, "train")
    logged = {log["step"]: log for log in history if "nerve/experts.0/pr_post_mean" in log}
    assert sorted(set(summaries["step"])) == sorted(logged) == [1, 2, 3, 4]
    for row in summaries.itertuples():
        for name in ("pr_post_mean", "pr_post_min", "pr_gain_mean", "pr_gain_max"):
            want = logged[row.step][f"nerve/experts.{row.layer}/{name}"]
            assert getattr(row, name) == pytest.approx(want, rel=1e-9)
    # trajectories and heatmaps draw a line per MoE layer: the token-weighted mean over its experts
    collapsed = expert_plots.collapse_experts(result.run.metrics)
    layer_rows = collapsed[collapsed["site"].isin(["experts.0", "experts.1"])]
    assert len(layer_rows) == 4 * 2 and not collapsed["site"].str.contains(r"\[").any()
    for row in layer_rows.itertuples():
        assert row.pr_post == pytest.approx(logged[row.step][f"nerve/{row.site}/pr_post_mean"], rel=1e-9)
        assert row.tokens == sum(r["tokens"] for r in records if r["step"] == row.step and r["layer"] == row.layer)
    routing = expert_plots.routing_from_logs(history, "train")
    assert len(routing) == 4 * 2 and not any(math.isnan(v) for v in routing["load_cv"])
