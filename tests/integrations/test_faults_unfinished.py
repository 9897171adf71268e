"""Windows that did not complete and objects reused: an interrupted training step, an evaluation that
raised, one callback given to two Trainers. Whatever ended a window, its rows are discarded with a warning
and the next measurement counts exactly its own tokens; state tied to a Trainer follows the Trainer.

Faults are real: a SIGINT delivered to the process inside a measured forward, an exception raised by a hook
in the third evaluation batch after the first FFN recorded it, two Trainers writing TensorBoard event files.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings

import pytest
import torch
from trainer_helpers import SEQ_LEN, make_trainer, tiny_gpt2, token_dataset

from nerve_hf import FFNTracker, NerveCallback
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sinks.records import read_records

RECORDS = "nerve_metrics.jsonl"


def eval_reference(model, n_eval: int, batch_size: int = 3) -> dict:
    """The eval set's metrics from a tracker of our own, in eval mode, in the Trainer's batches."""
    ids = torch.tensor(token_dataset(n_eval, seed=2)["input_ids"])
    tracker = FFNTracker(model, flow=False)
    was_training = model.training
    model.eval()
    with tracker, torch.no_grad():
        for batch in ids.split(batch_size):
            model(input_ids=batch)
    model.train(was_training)
    return {row["site"]: row for row in tracker.compute().rows}


def check_eval(record, reference):
    assert record["tokens"] == reference["tokens"]
    for name in METRIC_NAMES:
        assert record[name] == pytest.approx(reference[name], rel=1e-6), (record["site"], name)


class InterruptInForward:
    """A forward pre-hook on the second block's FFN: the ``n``-th train-mode call delivers SIGINT to this
    process, which Python raises as KeyboardInterrupt inside the forward (a user pressing Ctrl-C)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, module, args):
        if not module.training:
            return
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)  # the interrupt arrives here, inside the forward


def test_evaluation_after_an_interrupted_step_counts_its_whole_eval_set(tmp_path):
    trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=1, flow=False)], max_steps=4, learning_rate=0.0)
    hook = trainer.model.transformer.h[1].mlp.register_forward_pre_hook(InterruptInForward(n=3))  # step 2
    # Python's own SIGINT handler, whatever the test runner's process installed (xdist workers differ)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    finally:
        signal.signal(signal.SIGINT, previous)
    hook.remove()
    with pytest.warns(RuntimeWarning, match="training step 2 did not complete"):
        metrics = trainer.evaluate()
    reference = eval_reference(trainer.model, 6)
    records = [r for r in read_records(tmp_path / RECORDS) if r["split"] == "eval"]
    assert sorted(r["site"] for r in records) == ["ffn.0", "ffn.1"]
    for record in records:
        assert record["tokens"] == 6 * SEQ_LEN
        check_eval(record, reference[record["site"]])
    assert metrics["eval_nerve/ffn.1/pr_post"] == pytest.approx(reference["ffn.1"]["pr_post"], rel=1e-6)
    train = [r for r in read_records(tmp_path / RECORDS) if r["split"] == "train"]
    assert sorted({r["step"] for r in train}) == [1]  # step 2 is not written half


class FailInEvalBatch:
    """A forward pre-hook on the second block's FFN raising (as an out-of-memory error would) in the
    ``n``-th eval-mode call, after the first block's FFN has recorded that batch."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self, module, args):
        if module.training:
            return
        self.calls += 1
        if self.calls == self.n:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")


def test_an_evaluation_that_raised_does_not_leak_into_the_next(tmp_path):
    trainer = make_trainer(tmp_path, [NerveCallback(flow=False)], n_eval=9)
    hook = trainer.model.transformer.h[1].mlp.register_forward_pre_hook(FailInEvalBatch(n=3))
    with pytest.raises(torch.OutOfMemoryError):
        trainer.evaluate()
    hook.remove()
    with pytest.warns(RuntimeWarning, match="an evaluation did not complete"):
        trainer.evaluate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean evaluation after it: no warning
        trainer.evaluate()
    reference = eval_reference(trainer.model, 9)
    records = list(read_records(tmp_path / RECORDS))
    assert len(records) == 4
    for record in records:
        assert record["tokens"] == 9 * SEQ_LEN
        check_eval(record, reference[record["site"]])


def test_an_evaluation_that_raised_mid_training_is_not_measured_later(tmp_path):
    """An evaluation interrupted, then training goes on: the next step's measurement and the next
    evaluation count only their own tokens."""
    callback = NerveCallback(every_n_steps=1, flow=False)
    trainer = make_trainer(tmp_path, [callback], n_eval=9, max_steps=2, eval_strategy="no", learning_rate=0.0)
    hook = trainer.model.transformer.h[1].mlp.register_forward_pre_hook(FailInEvalBatch(n=2))
    with pytest.raises(torch.OutOfMemoryError):
        trainer.evaluate()
    hook.remove()
    with pytest.warns(RuntimeWarning, match="an evaluation did not complete"):
        trainer.train()
    trainer.evaluate()
    records = list(read_records(tmp_path / RECORDS))
    assert {r["tokens"] for r in records if r["split"] == "train"} == {2 * 2 * SEQ_LEN}
    reference = eval_reference(trainer.model, 9)
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 2
    for record in evals:
        check_eval(record, reference[record["site"]])


def test_one_callback_for_two_trainers_writes_to_each_trainers_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    callback = NerveCallback(every_n_steps=1, flow=False)
    runs = []
    for name in ("first", "second"):
        monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / f"tb_{name}"))  # read by each Trainer
        trainer = make_trainer(
            tmp_path / name, [callback], max_steps=2, logging_steps=1, eval_strategy="no", report_to=["tensorboard"]
        )
        trainer.train()
        runs.append(trainer)
    for name, trainer in zip(("first", "second"), runs):
        files = sorted((tmp_path / f"tb_{name}").glob("events.out.tfevents.*"))
        assert len(files) == 1, (name, files)  # nothing of the second run in the first run's folder
        events = EventAccumulator(str(files[0]), size_guidance={"histograms": 0, "scalars": 0})
        events.Reload()
        logged = {e["step"]: e["nerve/mean/se_pre"] for e in trainer.state.log_history if "nerve/mean/se_pre" in e}
        assert sorted(logged) == [1, 2]
        scalars = {e.step: e.value for e in events.Scalars("train/nerve/mean/se_pre")}
        assert scalars == pytest.approx(logged, rel=1e-6), name
        histograms = events.Histograms("train/nerve/ffn.0/log10_spectrum_pre")
        assert sorted(h.step for h in histograms) == [1, 2], name
        records = list(read_records(tmp_path / name / RECORDS))
        assert sorted({r["step"] for r in records}) == [1, 2] and all(math.isfinite(r["se_pre"]) for r in records)
    names = [type(cb).__name__ for cb in runs[1].callback_handler.callbacks]
    assert names.index("NerveCallback") < names.index("TensorBoardCallback")


# ------------------------------------------------------------------ devices and allocations
@pytest.mark.parametrize("value", ["cuda:99", "gpu", "", "meta", "cuda:x"])
def test_a_device_that_does_not_parse_or_exist_is_refused_where_given(value):
    from nerve_hf import NerveConfig

    with pytest.raises(ValueError, match=r"^state_device must be None or a device such as 'cpu' or 'cuda:0'"):
        NerveCallback(state_device=value)
    with pytest.raises(ValueError, match=r"^state_device must be None or a device"):
        FFNTracker(tiny_gpt2(), state_device=value)
    config = NerveConfig()
    with pytest.raises(ValueError, match=r"^state_device must be"):
        config.state_device = value
    assert NerveConfig(state_device="cpu").state_device == "cpu"


ALLOCATION_RUN = """
import sys, warnings
from trainer_helpers import make_trainer, tiny_gpt2
from nerve_hf import NerveCallback
from nerve_hf.sinks.records import read_records
warnings.simplefilter("always")
# FFN width 250000: its float64 covariance state (2 x 250000^2 x 8 bytes = 1 TB) cannot be allocated
model = tiny_gpt2(n_inner=250000)
trainer = make_trainer(sys.argv[1], [NerveCallback(every_n_steps=1, flow=False)], max_steps=2, model=model,
                       n_train=4, eval_strategy="no", gradient_accumulation_steps=1)
with warnings.catch_warnings(record=True) as caught:
    trainer.train()
print("GLOBAL", trainer.state.global_step)
records = read_records(sys.argv[1] + "/nerve_metrics.jsonl")
print("RECORDS", sorted((r["step"], r["site"], r["tokens"], r["se_pre"] != r["se_pre"]) for r in records))
print("WARNED", sum("can't allocate memory" in str(w.message) and "lost" in str(w.message) for w in caught) >= 1)
"""


def test_an_allocation_failure_inside_a_hook_is_a_lost_window_not_a_crash(tmp_path):
    from fault_helpers import run_python

    proc = run_python(ALLOCATION_RUN, str(tmp_path / "out"), drop_override=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GLOBAL 2" in proc.stdout
    assert "RECORDS [(1, 'ffn.0', 0, True), (1, 'ffn.1', 0, True), (2, 'ffn.0', 0, True), (2, 'ffn.1', 0, True)]" in (
        proc.stdout
    )
    assert "WARNED True" in proc.stdout


# ------------------------------------------------------------------ a failure on one process of two
@pytest.mark.distributed
def test_a_failure_on_one_rank_is_nan_on_every_rank_and_training_goes_on(tmp_path):
    """Rank 1's eigendecomposition raises at step 2 while rank 0 is in the exchange, and its hook fails at
    step 3: no collective is left waiting (gloo would abort), both ranks log NaN for exactly those steps, and
    the same finite values for the others."""
    import json

    from distributed_helpers import torchrun

    torchrun("rank_failure.py", str(tmp_path), nproc=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, result in enumerate(results):
        assert result["step"] == 4
        logged = {int(step): values for step, values in result["logged"].items()}
        assert sorted(logged) == [1, 2, 3, 4]
        for step in (2, 3):
            assert all(math.isnan(v) for v in logged[step]), (rank, step)
        for step in (1, 4):
            assert all(math.isfinite(v) for v in logged[step]), (rank, step)
            assert logged[step] == results[0]["logged"][str(step)]  # the ranks agree
        lost = [w for w in result["warnings"] if "lost" in w]
        assert lost, (rank, result["warnings"])
    assert any("LinAlgError" in w for w in results[1]["warnings"])
