"""FFNTracker on wrapped models: DDP, FSDP (1 and 2), checkpoint wrappers, torch.compile.

Each wrapped run must equal the same tracker on the bare model (itself checked against a float64
reference in test_tracker.py).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from reference import assert_rows_equal
from torch import nn

from nerve_hf.tracking.tracker import FFNTracker
from tests.tracking.test_tracker import LENGTHS, batch, build, run_tracker


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def assert_same_report(got, expected, rel=1e-6):
    assert_rows_equal(got.rows, expected.rows, rel=rel, abs=1e-9)


@pytest.fixture
def gpt2_and_expected():
    model = build("gpt2")
    inputs = batch(side="left")
    return model, inputs, run_tracker(model, inputs)


def test_data_parallel_on_one_device_is_measured_and_over_several_refused(gpt2_and_expected):
    model, inputs, expected = gpt2_and_expected
    dp = nn.DataParallel(model)  # no GPU here: no replicas, the wrapper calls the model itself
    tracker = FFNTracker(dp, flow=False)
    assert tracker.root is model
    with torch.no_grad(), tracker:
        dp(**inputs)
    assert_same_report(tracker.compute(), expected)
    dp.device_ids = [0, 1]  # what it holds on a machine with two GPUs: threaded replicas, sliced batches
    with pytest.raises(ValueError, match="DataParallel over 2 devices .* DistributedDataParallel"):
        FFNTracker(dp, flow=False)


def test_ddp_wrapped(process_group, gpt2_and_expected):
    model, inputs, expected = gpt2_and_expected
    ddp = nn.parallel.DistributedDataParallel(model)
    tracker = FFNTracker(ddp, flow=False)
    assert tracker.root is model
    with tracker:
        out = ddp(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
    report = tracker.compute()  # runs sync_accumulators inside an initialised group
    assert report.rows[0]["tokens"] == sum(LENGTHS)
    assert_same_report(report, expected)


def test_fsdp1_and_fsdp2_wrapped(process_group, gpt2_and_expected):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    _, inputs, expected = gpt2_and_expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1 deprecation notices
        fsdp1 = FullyShardedDataParallel(build("gpt2"), device_id=torch.device("cpu"), use_orig_params=True)
    assert_same_report(run_tracker(fsdp1, inputs), expected)

    fsdp2 = build("gpt2")
    for block in fsdp2.transformer.h:
        fully_shard(block)
    fully_shard(fsdp2)
    assert_same_report(run_tracker(fsdp2, inputs), expected)


def test_checkpoint_wrapped_blocks_count_once(gpt2_and_expected):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model, inputs, expected = gpt2_and_expected
    model.train()
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "GPT2Block")
    assert "transformer.h.0._checkpoint_wrapped_module.mlp.c_fc" in dict(model.named_modules())
    tracker = FFNTracker(model, flow=False)
    with tracker:
        # use_cache=False: a recomputed block would otherwise append to the KV cache twice
        model(**inputs, labels=inputs["input_ids"], use_cache=False).loss.backward()  # backward re-runs blocks
    assert_same_report(tracker.compute(), expected)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 13), nn.GELU(), nn.Linear(13, 8)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x, attention_mask=None):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture
def small_net():
    torch.manual_seed(0)
    model = _Net()
    x = torch.randn(3, 7, 8)
    mask = torch.ones(3, 7)
    mask[0, 4:] = 0
    return model, x, mask


def test_torch_compile_entered_before_first_call(small_net):
    model, x, mask = small_net
    expected = FFNTracker(model, flow=False)
    with expected:
        model(x, attention_mask=mask)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    tracker = FFNTracker(compiled, flow=False)
    assert tracker.root is model
    for _ in range(2):
        with tracker:
            compiled(x, attention_mask=mask)
        compiled(x, attention_mask=mask)  # outside the tracker: not counted
    report = tracker.compute()
    assert report.rows[0]["tokens"] == 2 * 18
    base = expected.compute()
    for a, b in zip(report.rows, base.rows):
        assert a["pr_pre"] == pytest.approx(b["pr_pre"], rel=1e-6)


def test_torch_compile_after_first_call(small_net):
    model, x, mask = small_net
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    compiled(x, attention_mask=mask)  # traced without hooks
    tracker = FFNTracker(compiled, flow=False)
    with tracker, pytest.warns(RuntimeWarning, match="skip_nnmodule_hook_guards"):
        compiled(x, attention_mask=mask)
    assert tracker.compute().rows[0]["tokens"] == 0  # the documented limitation, made loud

    # config.patch, not monkeypatch.setattr: undoing the latter deletes the option from dynamo's config
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")
        compiled(x, attention_mask=mask)
        tracker = FFNTracker(compiled, flow=False)
        with tracker:
            compiled(x, attention_mask=mask)
        assert tracker.compute().rows[0]["tokens"] == 18
    torch._dynamo.reset()
