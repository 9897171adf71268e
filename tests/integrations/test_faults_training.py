"""Faults injected into real Trainer runs: the monitor never stops training, never loses or duplicates a
record, and counts only the tokens it should.

Faults are real: folders made read-only for a process without root's override capabilities, output folders
deleted or replaced by a file mid-run, a process SIGKILLed right after a write, a torn final line, weights
poisoned with Inf, eval-mode forwards outside an evaluation, eval sets that 2 processes cannot split evenly.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from distributed_helpers import WORKERS, torchrun
from fault_helpers import REPO, read_only, run_python, tear_last_line
from trainer_helpers import SEQ_LEN, make_trainer, tiny_gpt2, token_dataset
from transformers import TrainerCallback

from model_adapters import LayerRangeError
from nerve_hf import FFNTracker, NerveCallback, NerveConfig
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sinks.records import read_records

RECORDS = "nerve_metrics.jsonl"


def keys(records):
    return sorted((r["split"], r["step"], r["site"]) for r in records)


def nerve_steps(history, prefix=""):
    return [e["step"] for e in history if f"{prefix}nerve/mean/se_pre" in e]


# ------------------------------------------------------------------ options: refused where they are given
BAD_OPTIONS = {
    "every_n_steps": ["5", 2.5, 0, -3, True, None],
    "measure_train": [1, "yes", None],
    "measure_eval": [0, "false"],
    "layers": ["0,1", 0, [0.5], [], [True], (("a",),)],
    "max_tokens": [1, "64", 10.0, False],
    "log_per_site": [1, None],
    "write_jsonl": ["true"],
    "layers_per_step": [0, "2", 1.5],
    "memory_budget_mb": [0, -1.0, float("nan"), float("inf"), "100", True],
    "metrics": ["PR", None, 3],
    "site_sharded": [1, "yes"],
    "state_device": [0, ["cpu"]],
    "spectra_dtype": ["float16", 64, None],
    "spectra": ["approximate", 1, None],
    "save_spectra": [0, "no"],
    "extra_metrics": [1, None],
    "flow": [1, "yes", None],
    "position_buckets": [[4, 2], [-1, 3], "0,16", [0.5], [], [True]],
    "cross_layer": ["neighbours", 2, True],
    "experts": [[-1], "0,1", [], [0.5], [True], 3],
    "experts_per_step": [0, -2, "4", 1.5, True],
}


def test_every_option_has_bad_values_listed():
    assert set(BAD_OPTIONS) == {f.name for f in fields(NerveConfig)}


@pytest.mark.parametrize("name,value", [(n, v) for n, values in BAD_OPTIONS.items() for v in values])
def test_wrong_option_is_refused_where_given(name, value):
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be "):
        NerveConfig(**{name: value})
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be "):
        NerveCallback(**{name: value})
    config = NerveConfig()
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be "):
        setattr(config, name, value)  # assignment after construction is checked too
    assert getattr(config, name) == getattr(NerveConfig(), name)  # and leaves the old value


def test_wrong_types_are_type_errors_and_good_values_pass():
    with pytest.raises(TypeError):
        NerveConfig(every_n_steps="5")
    with pytest.raises(ValueError):
        NerveConfig(every_n_steps=0)
    config = NerveConfig(every_n_steps=3, layers=(0, -1), max_tokens=2, memory_budget_mb=1, metrics="pr")
    assert config.layers == [0, -1] and config.memory_budget_mb == 1


def test_options_that_cannot_go_together_are_refused_where_given():
    with pytest.raises(ValueError, match=r"^cross_layer cannot be measured with site_sharded=True"):
        NerveCallback(site_sharded=True, cross_layer="adjacent")
    config = NerveConfig(site_sharded=True, flow=True, position_buckets=[0, 8])  # these go with each FFN's owner
    assert config.site_sharded and config.position_buckets == [0, 8]


def test_layer_out_of_range_is_refused_when_the_trainer_is_built(tmp_path):
    with pytest.raises(LayerRangeError, match=r"layer 99 is out of range.* 2 blocks.*0\.\.1"):
        make_trainer(tmp_path, [NerveCallback(layers=[1, 99])])


# ------------------------------------------------------------------ output folders that fail
UNWRITABLE_RUN = """
import sys, warnings
from nerve_hf import NerveCallback
from trainer_helpers import make_trainer
warnings.simplefilter("always")
trainer = make_trainer(sys.argv[1], [NerveCallback(every_n_steps=2)], max_steps=4)
with warnings.catch_warnings(record=True) as caught:
    trainer.train()
steps = [e["step"] for e in trainer.state.log_history if "nerve/mean/se_pre" in e]
print("STEPS", steps, "GLOBAL", trainer.state.global_step)
print("WARNINGS", sum("records are not being written" in str(w.message) for w in caught))
"""


def test_unwritable_output_dir_warns_once_and_training_finishes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        proc = run_python(UNWRITABLE_RUN, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS [2, 4] GLOBAL 4" in proc.stdout
    assert "WARNINGS 1" in proc.stdout  # once, although 4 measurements failed to write
    assert not (out / RECORDS).exists()


class BreakOutputDir(TrainerCallback):
    """At ``step``: delete the output folder, or replace it with a file."""

    def __init__(self, step: int, how: str):
        self.step, self.how = step, how

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            shutil.rmtree(args.output_dir)
            if self.how == "file":
                Path(args.output_dir).write_text("not a folder")


def test_output_dir_deleted_mid_run_is_recreated(tmp_path):
    out = tmp_path / "out"
    trainer = make_trainer(
        out, [NerveCallback(every_n_steps=1), BreakOutputDir(3, "delete")], max_steps=4, eval_strategy="no"
    )
    trainer.train()
    records = list(read_records(out / RECORDS))
    assert keys(records) == [("train", s, f"ffn.{i}") for s in (3, 4) for i in (0, 1)]


def test_output_dir_replaced_by_a_file_warns_and_training_finishes(tmp_path):
    out = tmp_path / "out"
    trainer = make_trainer(
        out, [NerveCallback(every_n_steps=1), BreakOutputDir(3, "file")], max_steps=4, eval_strategy="no"
    )
    with pytest.warns(RuntimeWarning, match="records are not being written to"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert nerve_steps(trainer.state.log_history) == [1, 2, 3, 4]  # the logs still carry every measurement
    assert out.read_text() == "not a folder"


# ------------------------------------------------------------------ crashes and resumes
def killed_run(out: Path, kill_at: int, resume: str = "") -> subprocess.CompletedProcess:
    env_code = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    return run_python(env_code, str(WORKERS / "killed_run.py"), str(out), str(kill_at), resume, drop_override=False)


def test_sigkill_then_resume_neither_duplicates_nor_drops_nor_tears(tmp_path):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    assert killed_run(reference, 0).returncode == 0
    proc = killed_run(crashed, 5)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed
    assert sorted({r["step"] for r in read_records(crashed / RECORDS) if r["split"] == "train"}) == [1, 2, 3, 4, 5]
    fragment = tear_last_line(crashed / RECORDS)  # and the kill came in the middle of the last line
    assert fragment and not fragment.endswith("\n")
    proc = killed_run(crashed, 0, str(crashed / "checkpoint-4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the resume dropped the torn fragment with the records after step 4
        resumed = list(read_records(crashed / RECORDS))
    expected = list(read_records(reference / RECORDS))
    assert keys(resumed) == keys(expected)  # every (split, step, site) once: nothing lost, nothing twice
    assert len(keys(resumed)) == (6 + 2) * 2
    by_key = {(r["split"], r["step"], r["site"]): r for r in expected}
    for record in resumed:
        reference_record = by_key[(record["split"], record["step"], record["site"])]
        assert record["tokens"] == reference_record["tokens"]
        for name in METRIC_NAMES:
            assert record[name] == pytest.approx(reference_record[name], rel=1e-5), (record["step"], name)
    lines = (crashed / RECORDS).read_text().splitlines()
    complete = [line for line in lines if line.startswith("{") and line.endswith("}")]
    assert len(complete) == len(resumed)  # no record was written half


class PoisonAt(TrainerCallback):
    """Inf in the first FFN's weights for the micro-batches of step ``step`` only: every weight is put back
    after that step's (NaN) update, and plain SGD keeps no state that could carry the NaN on."""

    def __init__(self, step: int):
        self.step, self.saved = step, None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.saved = {k: v.clone() for k, v in model.state_dict().items()}
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight.fill_(float("inf"))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.load_state_dict(self.saved)


def test_inf_at_a_chosen_step_gives_nan_there_only(tmp_path):
    trainer = make_trainer(
        tmp_path,
        [NerveCallback(every_n_steps=1), PoisonAt(2)],
        max_steps=3,
        eval_strategy="no",
        learning_rate=0.0,
        max_grad_norm=0.0,
        optim="sgd",
    )
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        trainer.train()
    records = {(r["step"], r["site"]): r for r in read_records(tmp_path / RECORDS)}
    assert records[(2, "ffn.0")]["tokens"] == 0 and math.isnan(records[(2, "ffn.0")]["se_pre"])
    for step in (1, 3):
        assert records[(step, "ffn.0")]["tokens"] == 2 * 2 * SEQ_LEN
        assert all(math.isfinite(records[(step, "ffn.0")][name]) for name in METRIC_NAMES)
    assert trainer.state.global_step == 3


# ------------------------------------------------------------------ which tokens count as evaluation
def eval_set_reference(model, n_eval: int, batch_size: int = 3) -> dict:
    """The eval set's metrics measured directly with a tracker, in eval mode, in the Trainer's batches."""
    ids = torch.tensor(token_dataset(n_eval, seed=2)["input_ids"])
    tracker = FFNTracker(model)
    model.eval()
    with tracker, torch.no_grad():
        for batch in ids.split(batch_size):
            model(input_ids=batch)
    return {row["site"]: row for row in tracker.compute().rows}


class InferenceBetweenEvaluations(TrainerCallback):
    """A user's own eval-mode forward at the end of step 2 (between the evaluations of steps 1 and 3)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                model(input_ids=torch.randint(1, 61, (5, SEQ_LEN)))
            model.train(was_training)


def test_eval_mode_forwards_outside_evaluation_are_not_counted(tmp_path):
    trainer = make_trainer(
        tmp_path,
        [NerveCallback(every_n_steps=10), InferenceBetweenEvaluations()],
        max_steps=3,
        eval_steps=1,
        learning_rate=0.0,
    )
    trainer.train()
    model = trainer.model
    # a notebook user's inference between two evaluate() calls
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(1, 61, (4, SEQ_LEN)))
    trainer.evaluate()
    evals = [r for r in read_records(tmp_path / RECORDS) if r["split"] == "eval"]
    assert sorted({r["step"] for r in evals}) == [1, 2, 3]
    assert {r["tokens"] for r in evals} == {6 * SEQ_LEN}  # the eval set and nothing else, every time
    reference = eval_set_reference(model, 6)  # learning rate 0: the weights never change
    for record in evals:
        for name in METRIC_NAMES:
            assert record[name] == pytest.approx(reference[record["site"]][name], rel=1e-6), (record["step"], name)


def test_evaluate_without_train_after_add_callback(tmp_path):
    trainer = make_trainer(tmp_path, None, n_eval=7)
    trainer.add_callback(NerveCallback())
    metrics = trainer.evaluate()
    reference = eval_set_reference(tiny_gpt2(), 7)  # same seed: the same weights as the trainer's model
    for name in METRIC_NAMES:
        assert metrics[f"eval_nerve/ffn.1/{name}"] == pytest.approx(reference["ffn.1"][name], rel=1e-6), name
    records = list(read_records(tmp_path / RECORDS))
    assert keys(records) == [("eval", 0, "ffn.0"), ("eval", 0, "ffn.1")]
    assert {r["tokens"] for r in records} == {7 * SEQ_LEN}  # its first batch counted once, not missed


def test_predict_is_measured_as_its_own_split(tmp_path):
    trainer = make_trainer(tmp_path, [NerveCallback()], n_eval=5)
    output = trainer.predict(token_dataset(5, seed=2))
    reference = eval_set_reference(tiny_gpt2(), 5)
    assert output.metrics["test_nerve/ffn.0/pr_post"] == pytest.approx(reference["ffn.0"]["pr_post"], rel=1e-6)
    assert keys(read_records(tmp_path / RECORDS)) == [("test", 0, "ffn.0"), ("test", 0, "ffn.1")]


@pytest.mark.distributed
@pytest.mark.parametrize("n_eval,per_device", [(5, 2), (7, 3)])
def test_two_processes_uneven_eval_set_equal_one(tmp_path, n_eval, per_device):
    torchrun("uneven_eval.py", str(tmp_path / "two"), str(n_eval), str(per_device), nproc=2)
    torchrun("uneven_eval.py", str(tmp_path / "one"), str(n_eval), str(per_device), nproc=1)
    two = {r["site"]: r for r in read_records(tmp_path / "two" / RECORDS)}
    one = {r["site"]: r for r in read_records(tmp_path / "one" / RECORDS)}
    assert set(two) == set(one) == {"ffn.0", "ffn.1"}
    for site in one:
        assert one[site]["tokens"] == two[site]["tokens"] == n_eval * SEQ_LEN  # padding repeats not counted
        for name in METRIC_NAMES:
            assert two[site][name] == pytest.approx(one[site][name], rel=1e-6, abs=1e-9), (site, name)


# ------------------------------------------------------------------ run_clm.py: bad input, one line, exit 2
def run_clm_cli(tmp_path, *args: str, env=None) -> subprocess.CompletedProcess:
    """``python scripts/run_clm.py --output_dir <tmp>/out args...`` as a real process in ``tmp_path``."""
    argv = [sys.executable, str(REPO / "scripts" / "run_clm.py"), "--output_dir", str(tmp_path / "out"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)


def run_clm_process(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """A 2-step run_clm on a small local corpus and tokenizer, with ``extra`` flags."""
    corpus = tmp_path / "train.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    tiny = "n_layer=2,n_embd=16,n_head=2,n_inner=37,n_positions=32"
    common = "--block_size 16 --max_steps 2 --per_device_train_batch_size 2 --report_to none --use_cpu true"
    return run_clm_cli(
        tmp_path, "--train_file", str(corpus), "--tokenizer_name", str(tiny_tokenizer(tmp_path)),
        "--config_overrides", tiny, *common.split(), "--save_strategy", "no", *extra,
    )  # fmt: skip


def tiny_tokenizer(tmp_path) -> Path:
    from nerve_hf.data import train_bpe_tokenizer

    path = tmp_path / "tokenizer"
    if not path.exists():
        train_bpe_tokenizer(["def f(x):\n    return x + 1\n" * 50], vocab_size=300).save_pretrained(str(path))
    return path


def one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_run_clm_refuses_layers_the_model_lacks_before_training(tmp_path):
    line = one_error_line(run_clm_process(tmp_path, "--do_train", "--nerve", "--nerve_layers", "1,99"))
    assert "layer 99 is out of range" in line and "0..1" in line
    assert not (tmp_path / "out" / RECORDS).exists() and not (tmp_path / "out" / "trainer_state.json").exists()


def test_run_clm_names_the_flag_and_key_of_a_bad_override(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    line = one_error_line(run_clm_cli(tmp_path, "--do_train", "--config_overrides", "n_layer=two", env=env))
    assert "--config_overrides n_layer=two" in line and "GPT2Config.n_layer takes an integer" in line


def test_run_clm_names_a_bad_nerve_flag(tmp_path):
    line = one_error_line(run_clm_cli(tmp_path, "--do_train", "--nerve", "--nerve_max_tokens", "1"))
    assert "--nerve_max_tokens must be None or an integer of at least 2" in line


def test_run_clm_eval_only_is_measured(tmp_path):
    proc = run_clm_process(
        tmp_path, "--do_eval", "--nerve", "--max_eval_samples", "4", "--per_device_eval_batch_size", "3"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert math.isfinite(results["eval_nerve/mean/pr_pre"])
    records = list(read_records(tmp_path / "out" / RECORDS))
    assert keys(records) == [("eval", 0, "ffn.0"), ("eval", 0, "ffn.1")]
    assert {r["tokens"] for r in records} == {4 * 16}


def test_add_to_measures_an_evaluation_from_its_first_batch_and_reaches_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # an evaluate()-only TensorBoard writer logs under ./runs/
    trainer = make_trainer(tmp_path, None, n_eval=7, report_to=["tensorboard"])
    callback = NerveCallback().add_to(trainer)
    names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert names.index("NerveCallback") < names.index("TensorBoardCallback")  # ahead of the integration
    metrics = trainer.evaluate()
    reference = eval_set_reference(tiny_gpt2(), 7)
    assert metrics["eval_nerve/ffn.0/se_post"] == pytest.approx(reference["ffn.0"]["se_post"], rel=1e-6)
    assert callback._eval_incomplete is None
    board = next(cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "TensorBoardCallback")
    board.tb_writer.flush()  # evaluate() alone never closes the writer
    events = EventAccumulator(board.tb_writer.log_dir)
    events.Reload()
    assert [e.value for e in events.Scalars("eval/nerve/ffn.0/se_post")] == pytest.approx(
        [metrics["eval_nerve/ffn.0/se_post"]], rel=1e-6
    )
    with pytest.raises(LayerRangeError):
        NerveCallback(layers=[5]).add_to(make_trainer(tmp_path / "other", None))
