"""Routed experts through NerveCallback: the options checked where given, the expert round-robin over steps,
the per-layer summaries in TensorBoard, experts the model lacks and expert parallelism refused."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nerve_hf import FFNTracker, NerveCallback
from nerve_hf.errors import InputError
from nerve_hf.integrations.config import NerveConfig
from nerve_hf.options import OptionTypeError, OptionValueError
from nerve_hf.probe.config import ProbeConfig
from nerve_hf.tracking.measurements.experts import ExpertRangeError
from tests.tracking.test_experts import _build

LENGTHS = [12, 9, 7, 12, 5, 10, 12, 8]


def _data():
    torch.manual_seed(0)
    return [
        {
            "input_ids": torch.randint(0, 61, (12,)),
            "attention_mask": torch.tensor([1] * n + [0] * (12 - n)),
            "labels": torch.randint(0, 61, (12,)),
        }
        for n in LENGTHS
    ]


def _trainer(tmp_path, callback, model=None, **overrides):
    options = dict(
        per_device_train_batch_size=4, max_steps=2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no"
    )
    options.update(overrides)
    args = tf.TrainingArguments(str(tmp_path), **options)
    model = model if model is not None else _build("mixtral").train()
    return tf.Trainer(model=model, args=args, train_dataset=_data(), callbacks=[callback])


def test_expert_options_are_checked_where_given():
    with pytest.raises(OptionValueError, match="experts must be"):
        NerveConfig(experts=[0, -1])
    with pytest.raises(OptionTypeError, match="experts must be"):
        NerveConfig(experts="0,1")
    with pytest.raises(OptionValueError, match="experts_per_step must be"):
        NerveConfig(experts_per_step=0)
    with pytest.raises(InputError, match="not both"):
        NerveConfig(experts=[0], experts_per_step=2)
    with pytest.raises(InputError, match="not both"):
        ProbeConfig(model="m", experts=[0], experts_per_step=2)
    assert NerveCallback(experts=[3, 1, 3]).config.experts == [1, 3]  # sorted, each once
    config = NerveConfig(experts_per_step=2)
    with pytest.raises(OptionValueError):
        config.experts_per_step = -1  # also when set later


def test_experts_the_model_lacks_are_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(ExpertRangeError, match="has 4 experts"):
        _trainer(tmp_path, NerveCallback(every_n_steps=1, experts=[2, 4]))


def test_round_robin_over_steps_and_per_layer_summaries_in_tensorboard(tmp_path):
    trainer = _trainer(tmp_path, NerveCallback(every_n_steps=1, experts_per_step=2), report_to=["tensorboard"])
    trainer.train()
    records = [json.loads(line) for line in open(tmp_path / "nerve_metrics.jsonl")]
    logs = {log["step"]: log for log in trainer.state.log_history if "nerve/mean/experts/pr_post_mean" in log}
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for step, share in ((1, [0, 1]), (2, [2, 3])):  # the next share of experts each measured step
        for layer in (0, 1):
            rows = [r for r in records if r["step"] == step and r["layer"] == layer]
            assert sorted(r["expert"] for r in rows) == share
            # the logged summary is the token-weighted mean over the rows of that layer's measured experts
            kept = [r for r in rows if r["pr_post"] is not None]
            weight = sum(r["tokens"] for r in kept)
            mean = sum(r["pr_post"] * r["tokens"] for r in kept) / weight
            key = f"nerve/experts.{layer}/pr_post_mean"
            assert logs[step][key] == pytest.approx(mean, rel=1e-9)
            gain_max = max(r["pr_post"] / r["pr_pre"] for r in kept)
            assert logs[step][f"nerve/experts.{layer}/pr_gain_max"] == pytest.approx(gain_max, rel=1e-9)
            # TensorBoard got the same per-layer keys (float32), at the same step
            for name in (key, f"nerve/experts.{layer}/pr_gain_max", f"nerve/experts.{layer}/router/load_cv"):
                scalars = {e.step: e.value for e in events.Scalars(f"train/{name}")}
                assert scalars[step] == pytest.approx(logs[step][name], rel=1e-6)
            # the routing statistics still cover every expert: all real tokens of the step
            tokens = logs[step][f"nerve/experts.{layer}/router/tokens"]
            assert sum(r["tokens"] for r in rows) <= 2 * tokens
    assert sum(logs[s]["nerve/experts.0/router/tokens"] for s in (1, 2)) == sum(LENGTHS)
    assert not any(tag.startswith("train/nerve/experts[") for tag in events.Tags()["scalars"])
    assert not any("experts[" in tag for tag in events.Tags()["histograms"])  # per-expert spectra: the archive


def _expert_parallel(model):
    for module in model.modules():
        if type(module).__name__.endswith("Experts"):
            module._is_expert_parallel = True  # what transformers' expert-parallel plan sets on sharded experts
    return model


def test_expert_parallelism_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="expert parallelism is not supported"):
        FFNTracker(_expert_parallel(_build("mixtral")))
    callback = NerveCallback(every_n_steps=1)
    with pytest.warns(RuntimeWarning, match="disabled.*expert parallelism is not supported: load"):
        trainer = _trainer(tmp_path, callback, model=_expert_parallel(_build("mixtral").train()))
    trainer.train()  # the run goes on, unmeasured
    assert not any(key.startswith("nerve/") for log in trainer.state.log_history for key in log)
    assert not math.isnan(trainer.state.log_history[-1]["train_loss"])


def test_histograms_skip_routed_experts():
    from nerve_hf.report import SpectralReport
    from nerve_hf.sinks.histograms import spectrum_shares

    spectrum = (torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 2.0], dtype=torch.float64))
    rows = [{"site": "ffn.0", "kind": "dense"}, {"site": "experts[0].1", "kind": "expert", "expert": 0}]
    report = SpectralReport(rows=rows, eigenvalues={"ffn.0": spectrum, "experts[0].1": spectrum})
    assert sorted(spectrum_shares(report, "train")) == [
        "train/nerve/ffn.0/log10_spectrum_post",
        "train/nerve/ffn.0/log10_spectrum_pre",
    ]


def test_each_evaluation_measures_the_next_share_of_experts_on_every_batch(tmp_path):
    callback = NerveCallback(every_n_steps=1, experts_per_step=2, measure_train=False)
    trainer = _trainer(tmp_path, callback, per_device_eval_batch_size=3)  # 8 samples: 3 eval batches
    trainer.eval_dataset = _data()
    for _ in range(2):
        trainer.evaluate()
    records = [json.loads(line) for line in open(tmp_path / "nerve_metrics.jsonl")]
    assert {r["split"] for r in records} == {"eval"}
    evaluations = sorted({r["step"] for r in records})  # both at step 0: told apart by the order of records
    assert evaluations == [0]
    shares = [sorted({r["expert"] for r in records[i : i + 4]}) for i in (0, 4)]
    assert shares == [[0, 1], [2, 3]]
    # every eval batch reached the share's rows: the tokens of each expert are those of all 8 samples
    model, data = trainer.model.eval(), _data()
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        for start in (0, 3, 6):
            batch = {k: torch.stack([d[k] for d in data[start : start + 3]]) for k in ("input_ids", "attention_mask")}
            model(**batch)
    want = {(r["layer"], r["expert"]): r["tokens"] for r in tracker.compute().rows}
    assert all(r["tokens"] == want[(r["layer"], r["expert"])] for r in records)
    logs = [log for log in trainer.state.log_history if "eval_nerve/experts.0/router/tokens" in log]
    assert [log["eval_nerve/experts.0/router/tokens"] for log in logs] == [sum(LENGTHS)] * 2
