"""NerveCallback inside real Trainer runs: steps, eval alignment, TensorBoard, JSONL, resume, DDP."""

import copy
import json
import math

import pytest
import torch
from distributed_helpers import torchrun
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from trainer_helpers import SEQ_LEN, make_trainer, tiny_gpt2
from transformers import TrainerCallback

from nerve_hf import FFNTracker, NerveCallback, NerveConfig
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sinks.records import read_records


class CaptureStep(TrainerCallback):
    """Keeps the weights before update k and the inputs of every micro-batch of step k."""

    def __init__(self, step: int):
        self.step, self.weights, self.inputs, self._handle = step, None, [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.weights = copy.deepcopy(model.state_dict())
            self._handle = model.register_forward_pre_hook(
                lambda module, a, kw: self.inputs.append({k: v.clone() for k, v in kw.items() if torch.is_tensor(v)}),
                with_kwargs=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def nerve_entries(log_history, prefix=""):
    return [entry for entry in log_history if f"{prefix}nerve/mean/se_pre" in entry]


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    capture = CaptureStep(step=4)
    trainer = make_trainer(out, [NerveCallback(every_n_steps=2), capture], report_to=["tensorboard"])
    trainer.train()
    return out, trainer, capture


def test_train_keys_at_exactly_the_measured_steps(tensorboard_run):
    _, trainer, _ = tensorboard_run
    entries = nerve_entries(trainer.state.log_history)
    assert [entry["step"] for entry in entries] == [2, 4, 6]
    for entry in entries:
        assert "loss" in entry  # the same record as the Trainer's loss of that step
        for site in ("ffn.0", "ffn.1", "mean"):
            for name in METRIC_NAMES:
                assert math.isfinite(entry[f"nerve/{site}/{name}"]), (site, name)
        assert entry["nerve/mean/pr_pre"] == pytest.approx(
            (entry["nerve/ffn.0/pr_pre"] + entry["nerve/ffn.1/pr_pre"]) / 2, rel=1e-12
        )
        assert 1 <= entry["nerve/ffn.0/pr_pre"] <= 37


def test_eval_keys_next_to_eval_loss(tensorboard_run):
    _, trainer, _ = tensorboard_run
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [3, 6]
    for entry in evals:
        assert math.isfinite(entry["eval_nerve/mean/se_post"])
        assert math.isfinite(entry["eval_nerve/ffn.1/js"])
    assert all("eval_nerve/mean/se_pre" not in e for e in trainer.state.log_history if "eval_loss" not in e)


def test_tensorboard_event_files_hold_the_metrics(tensorboard_run):
    out, trainer, _ = tensorboard_run
    event_files = list(out.rglob("events.out.tfevents.*"))  # <output_dir>/runs/<date_host>/
    assert event_files
    accumulator = EventAccumulator(str(event_files[0].parent))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    train_events = accumulator.Scalars("train/nerve/ffn.0/se_pre")
    assert [event.step for event in train_events] == [2, 4, 6]
    logged = [entry["nerve/ffn.0/se_pre"] for entry in nerve_entries(trainer.state.log_history)]
    assert [event.value for event in train_events] == pytest.approx(logged, rel=1e-6)
    eval_events = accumulator.Scalars("eval/nerve/mean/pr_post")
    assert [event.step for event in eval_events] == [3, 6]
    assert "train/nerve/mean/eee_post" in scalars and "eval/nerve/ffn.1/js" in scalars


def test_jsonl_records(tensorboard_run):
    out, _, _ = tensorboard_run
    records = list(read_records(out / "nerve_metrics.jsonl"))
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [(r["step"], r["site"]) for r in train] == [(s, f"ffn.{layer}") for s in (2, 4, 6) for layer in (0, 1)]
    assert [(r["step"], r["layer"]) for r in evals] == [(s, layer) for s in (3, 6) for layer in (0, 1)]
    # gradient accumulation counted in full: 2 micro-batches x 2 sequences x SEQ_LEN tokens
    assert {r["tokens"] for r in train} == {2 * 2 * SEQ_LEN}
    assert {r["tokens"] for r in evals} == {6 * SEQ_LEN}
    assert {r["dim"] for r in records} == {37}
    assert set(METRIC_NAMES) <= set(records[0])


def test_logged_metrics_equal_recomputation_before_update(tensorboard_run):
    _, trainer, capture = tensorboard_run
    assert len(capture.inputs) == 2  # both micro-batches of step 4
    model = tiny_gpt2()
    model.load_state_dict(capture.weights)
    model.train()  # the Trainer measured in train mode (dropout is 0)
    tracker = FFNTracker(model)
    with tracker, torch.no_grad():
        for inputs in capture.inputs:
            model(**inputs)
    expected = tracker.compute().to_log_dict()
    logged = next(e for e in trainer.state.log_history if e["step"] == 4 and "nerve/mean/se_pre" in e)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # and they differ from the weights after update 4, so the test can tell them apart
    stepped = tiny_gpt2()
    stepped.load_state_dict(capture.weights)
    with torch.no_grad():
        for _name, parameter in stepped.named_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    other = FFNTracker(stepped)
    with other, torch.no_grad():
        for inputs in capture.inputs:
            stepped(**inputs)
    assert other.compute().to_log_dict()["nerve/ffn.0/pr_pre"] != pytest.approx(logged["nerve/ffn.0/pr_pre"], rel=1e-6)


def test_added_later_options_and_no_train_measurement(tmp_path):
    trainer = make_trainer(tmp_path, None, max_steps=4, eval_steps=2, report_to=[])
    trainer.add_callback(
        NerveCallback(NerveConfig(every_n_steps=1, measure_train=False, layers=[-1], log_per_site=True))
    )
    trainer.train()
    history = trainer.state.log_history
    assert nerve_entries(history) == []
    evals = nerve_entries(history, prefix="eval_")
    assert [e["step"] for e in evals] == [2, 4]
    assert "eval_nerve/ffn.1/se_pre" in evals[0] and "eval_nerve/ffn.0/se_pre" not in evals[0]
    metrics = trainer.evaluate()  # a call outside train() is measured too
    assert math.isfinite(metrics["eval_nerve/mean/pr_pre"])


def test_max_tokens_cap(tmp_path):
    trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=3, max_tokens=20)], max_steps=3)
    trainer.train()
    records = list(read_records(tmp_path / "nerve_metrics.jsonl"))
    assert {r["tokens"] for r in records} == {20}


def test_resume_neither_duplicates_nor_drops(tmp_path):
    callback_options = dict(every_n_steps=2)
    first = make_trainer(tmp_path, [NerveCallback(**callback_options)], save_strategy="steps", save_steps=3)
    first.train()
    full = [(r["step"], r["split"], r["site"]) for r in read_records(tmp_path / "nerve_metrics.jsonl")]
    # pretend the run died after step 6 was measured but before checkpoint 6 was written
    import shutil

    shutil.rmtree(tmp_path / "checkpoint-6")
    second = make_trainer(tmp_path, [NerveCallback(**callback_options)], save_strategy="steps", save_steps=3)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    resumed = [(r["step"], r["split"], r["site"]) for r in read_records(tmp_path / "nerve_metrics.jsonl")]
    assert sorted(resumed) == sorted(full)
    assert len(resumed) == len(set(resumed)) == (3 + 2) * 2


class PoisonWeights(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == 3:
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight.fill_(float("inf"))


def test_nonfinite_activations_warn_log_nan_and_training_finishes(tmp_path):
    trainer = make_trainer(
        tmp_path, [NerveCallback(every_n_steps=1), PoisonWeights()], max_steps=4, eval_strategy="no", max_grad_norm=0.0
    )
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        trainer.train()
    assert trainer.state.global_step == 4
    entries = nerve_entries(trainer.state.log_history)
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    assert math.isfinite(entries[0]["nerve/ffn.0/se_pre"])
    assert math.isnan(entries[2]["nerve/ffn.0/se_pre"])
    records = [r for r in read_records(tmp_path / "nerve_metrics.jsonl") if r["step"] == 3]
    assert math.isnan(records[0]["pr_pre"])
    raw = (tmp_path / "nerve_metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in raw)  # strict JSON: NaN written as null


def test_unknown_architecture_disables_with_warning(tmp_path):
    class Opaque(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(61, 8)

        def forward(self, input_ids=None, labels=None, **kwargs):
            return {"loss": self.embed(input_ids).pow(2).mean()}

    with pytest.warns(RuntimeWarning, match="NerveCallback is disabled"):
        trainer = make_trainer(
            tmp_path, [NerveCallback(every_n_steps=1)], model=Opaque(), max_steps=2, eval_strategy="no"
        )
        trainer.train()
    assert trainer.state.global_step == 2


def test_data_parallel_over_several_gpus_disables_with_warning(tmp_path, monkeypatch):
    """Several GPUs in one process make the Trainer use nn.DataParallel (parallel_mode NOT_DISTRIBUTED);
    this machine has none, so the mode is forced and the Trainer otherwise runs as on one device."""
    from transformers import TrainingArguments
    from transformers.training_args import ParallelMode

    monkeypatch.setattr(TrainingArguments, "parallel_mode", property(lambda self: ParallelMode.NOT_DISTRIBUTED))
    model = tiny_gpt2()
    with pytest.warns(RuntimeWarning, match="nn.DataParallel .* torchrun"):
        trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=1)], model=model, max_steps=2, eval_strategy="no")
        trainer.train()
    assert trainer.state.global_step == 2
    assert not any(key.startswith("nerve/") for entry in trainer.state.log_history for key in entry)
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())


def test_bad_options_raise():
    with pytest.raises(ValueError, match="every_n_steps"):
        NerveCallback(every_n_steps=0)
    with pytest.raises(TypeError, match="unknown NerveCallback options"):
        NerveCallback(every_n_step=5)


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path):
    torchrun("trainer_run.py", str(tmp_path / "two"), "1", nproc=2)
    torchrun("trainer_run.py", str(tmp_path / "one"), "2", nproc=1)
    two = {(r["step"], r["split"], r["site"]): r for r in read_records(tmp_path / "two" / "nerve_metrics.jsonl")}
    one = {(r["step"], r["split"], r["site"]): r for r in read_records(tmp_path / "one" / "nerve_metrics.jsonl")}
    assert set(two) == set(one) and len(one) == 4  # train and eval at step 1, two sites each
    for key in one:
        assert two[key]["tokens"] == one[key]["tokens"]
        for name in METRIC_NAMES:
            assert two[key][name] == pytest.approx(one[key][name], rel=1e-6, abs=1e-9), (key, name)


def test_torch_compiled_model_is_measured(tmp_path):
    trainer = make_trainer(
        tmp_path,
        [NerveCallback(every_n_steps=2)],
        max_steps=2,
        eval_strategy="no",
        torch_compile=True,
        torch_compile_backend="eager",
    )
    trainer.train()
    entries = nerve_entries(trainer.state.log_history)
    assert [e["step"] for e in entries] == [2]
    assert math.isfinite(entries[0]["nerve/ffn.1/pr_post"])
    records = list(read_records(tmp_path / "nerve_metrics.jsonl"))
    assert {r["tokens"] for r in records} == {2 * 2 * SEQ_LEN}


def test_second_train_call_is_measured_again(tmp_path):
    trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=2)], max_steps=2, eval_strategy="no")
    trainer.train()
    trainer.args.max_steps = 4
    trainer.train(resume_from_checkpoint=False)
    steps = [e["step"] for e in nerve_entries(trainer.state.log_history)]
    assert steps == [2, 4]  # the second train() starts a fresh state and is measured throughout
    assert math.isfinite(nerve_entries(trainer.state.log_history)[-1]["nerve/ffn.0/se_pre"])
