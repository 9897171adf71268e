"""What nerve_hf.integrations.trainer_internals relies on in transformers and accelerate, checked on the
installed releases: each test fails when a release changes one of these behaviours."""

import sys
import types

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator
from trainer_helpers import make_trainer
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

from nerve_hf.integrations import trainer_internals as internals
from nerve_hf.integrations.log_keys import eval_prefix


class Recorder(TrainerCallback):
    """Notes every on_log it gets in a shared list, with what it sees at that moment."""

    def __init__(self, name: str, seen: list, move: bool = False):
        self.name, self.seen, self.move = name, seen, move

    def on_log(self, args, state, control, logs=None, **kwargs):
        handler = internals.find_callback_handler(self)
        self.seen.append((self.name, handler, dict(state.log_history[-1]), state.global_step))
        if self.move:
            internals.place_after_default_flow(handler, self)


def names(handler) -> list[str]:
    return [type(cb).__name__ for cb in handler.callbacks]


def test_a_trainer_puts_default_flow_first_then_the_integrations_then_user_callbacks(tmp_path):
    seen = []
    trainer = make_trainer(tmp_path, [Recorder("user", seen)], report_to=["tensorboard"])
    handler = trainer.callback_handler
    assert isinstance(handler, CallbackHandler) and isinstance(handler.callbacks, list)
    order = names(handler)
    assert order[0] == "DefaultFlowCallback" and isinstance(handler.callbacks[0], DefaultFlowCallback)
    assert order[1:3] == ["TensorBoardCallback", "Recorder"]  # the integrations come before user callbacks


def test_the_handler_calls_on_log_in_list_order_from_a_frame_that_finds_it(tmp_path):
    seen = []
    trainer = make_trainer(tmp_path, [Recorder("first", seen), Recorder("second", seen)])
    trainer.log({"probe": 1.5})
    assert [name for name, *_ in seen] == ["first", "second"]
    for _, handler, last_log, step in seen:
        assert handler is trainer.callback_handler  # found up the call stack
        assert last_log == {"probe": 1.5, "epoch": 0, "step": 0} and step == 0  # appended before on_log
    assert internals.find_callback_handler(trainer.callback_handler.callbacks[-1]) is None  # outside an event


def test_moving_ahead_during_an_event_calls_every_callback_once_then_runs_first(tmp_path):
    seen = []
    trainer = make_trainer(
        tmp_path, [Recorder("a", seen), Recorder("mover", seen, move=True), Recorder("b", seen)],
        report_to=["tensorboard"],
    )  # fmt: skip
    trainer.log({"probe": 1.0})
    assert [name for name, *_ in seen] == ["a", "mover", "b"]  # each once, although the list changed
    order = names(trainer.callback_handler)
    assert order[:2] == ["DefaultFlowCallback", "Recorder"] and order.index("TensorBoardCallback") == 2
    seen.clear()
    trainer.log({"probe": 2.0})
    assert [name for name, *_ in seen] == ["mover", "a", "b"]


def test_add_to_last_log_reaches_the_trainers_history(tmp_path):
    class Adder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            internals.add_to_last_log(state, {"nerve/x": 3.0})

    trainer = make_trainer(tmp_path, [Adder()])
    trainer.log({"probe": 1.0})
    assert trainer.state.log_history[-1] == {"probe": 1.0, "epoch": 0, "step": 0, "nerve/x": 3.0}


def test_the_tensorboard_integration_makes_its_writer_lazily_and_drops_it_after_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a writer made before train() logs under ./runs/
    trainer = make_trainer(tmp_path / "out", None, max_steps=1, eval_strategy="no", report_to=["tensorboard"])
    board = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback))
    assert board.tb_writer is None  # nothing until the first use
    writer = internals.tensorboard_writer(trainer.callback_handler, trainer.args)
    assert writer is board.tb_writer and type(writer).__name__ == "SummaryWriter"
    writer.add_histogram("probe", torch.tensor([-1.0, -0.5, 0.0]).numpy(), 3)
    writer.flush()
    events = EventAccumulator(writer.log_dir, size_guidance={HISTOGRAMS: 0})
    events.Reload()
    assert [(h.step, h.histogram_value.num) for h in events.Histograms("probe")] == [(3, 3.0)]
    trainer.train()
    assert board.tb_writer is None  # closed and dropped by on_train_end: so asked for at every write
    fresh = internals.tensorboard_writer(trainer.callback_handler, trainer.args)
    assert fresh is board.tb_writer and fresh is not writer
    fresh.close()
    assert internals.tensorboard_writer(make_trainer(tmp_path / "none", None).callback_handler, None) is None


def test_wandb_module_is_the_imported_module_with_a_run(tmp_path, monkeypatch):
    args = make_trainer(tmp_path, None).args
    fake = types.SimpleNamespace(run=object())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert internals.wandb_module(args) is None  # not in report_to
    args.report_to = ["wandb"]
    assert internals.wandb_module(args) is fake
    fake.run = None
    assert internals.wandb_module(args) is None  # no run yet
    monkeypatch.delitem(sys.modules, "wandb")
    assert internals.wandb_module(args) is None  # never imported here


def test_accelerate_reports_the_remainder_of_the_last_batch(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import GradientState

    make_trainer(tmp_path, None)  # the Trainer's accelerator initializes the shared state
    loader = Accelerator(cpu=True).prepare(torch.utils.data.DataLoader(list(range(5)), batch_size=2))
    assert internals.padded_last_batch() is None  # outside a dataloader
    seen = [(batch.tolist(), GradientState().end_of_dataloader, internals.padded_last_batch()) for batch in loader]
    assert seen == [([0, 1], False, None), ([2, 3], False, None), ([4], True, 1)]  # 5 % 2 samples are real
    shard = internals.process_shard(loader)
    assert shard is loader.base_dataloader and next(iter(shard)).tolist() == [0, 1]
    plain = [[0, 1]]
    assert internals.process_shard(plain) is plain


@pytest.mark.parametrize("key_prefix", ["eval", "eval_valid"])
def test_evaluation_metrics_carry_their_runtime_under_the_prefix(tmp_path, key_prefix):
    trainer = make_trainer(tmp_path, None, max_steps=1, eval_strategy="no")
    metrics = trainer.evaluate(metric_key_prefix=key_prefix)
    assert f"{key_prefix}_runtime" in metrics and eval_prefix(metrics) == f"{key_prefix}_"
    assert eval_prefix(trainer.predict(trainer.eval_dataset).metrics) == "test_"
    trainer.train()
    final = trainer.state.log_history[-1]
    assert "train_runtime" in final and eval_prefix(final) is None  # the end-of-training record is not one


def test_generate_runs_its_forwards_from_the_generation_package():
    """in_generation: every forward generate makes (the prefill and each decoding step) has a frame of
    transformers/generation/ above it; a direct call of the model has none."""
    from trainer_helpers import tiny_gpt2

    model, seen = tiny_gpt2().eval(), []
    model.register_forward_pre_hook(lambda module, args: seen.append(internals.in_generation()))
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert seen[0] is False and len(seen) == 4 and all(seen[1:])
