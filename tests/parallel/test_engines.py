"""Large-model engines. FSDP: the Trainer cannot run it on CPU (accelerate enables its FSDP plugin only for accelerator
back ends; on CPU processes it trains with DDP instead), so the closest case that can run is tested:
a hand-written loop under FSDP2 ``fully_shard`` on 2 gloo processes equals 1 process on the same
global batches. The Trainer's own data-parallel path is tested in test_callback and test_faults_training.
DeepSpeed ZeRO-3: the ``deepspeed`` package ships as source only and its CPU accelerator needs Intel's
oneCCL bindings, not gloo, so it does not run here; what is tested is that the tracker never reads a
parameter that ZeRO-3 has partitioned."""

import json

import pytest
from distributed_helpers import torchrun

from nerve_hf.metrics import METRIC_NAMES


@pytest.mark.distributed
def test_fsdp2_training_loop_on_two_processes_equals_one(tmp_path):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    torchrun("fsdp_loop.py", str(tmp_path / "two"), nproc=2)
    torchrun("fsdp_loop.py", str(tmp_path / "one"), nproc=1)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in range(2):
        two = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        assert [r["site"] for r in two] == [r["site"] for r in one] == ["ffn.0", "ffn.1"]
        for got, want in zip(two, one):
            assert got["tokens"] == want["tokens"] == 4 * 9  # the global batch of step 2, counted once
            for name in METRIC_NAMES:
                assert got[name] == pytest.approx(want[name], rel=1e-9, abs=1e-12), (rank, got["site"], name)


def test_trainer_on_cpu_does_not_enable_fsdp():
    """The fact the module docstring rests on: FSDP in TrainingArguments is not applied on CPU processes."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    assert state.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)
    assert not hasattr(AcceleratorState, "fsdp_plugin") or AcceleratorState._shared_state.get("fsdp_plugin") is None


def test_tracker_reads_no_partitioned_parameter():
    """DeepSpeed ZeRO-3 leaves each rank an empty placeholder per parameter (the real shape lives in
    ``ds_shape``) outside the forward. The tracker finds every FFN and its width from the modules' own
    attributes, so it builds on such a model without touching a parameter's data."""
    import torch
    from trainer_helpers import tiny_gpt2

    from nerve_hf import FFNTracker

    model = tiny_gpt2()
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            placeholder = torch.nn.Parameter(torch.empty(0), requires_grad=parameter.requires_grad)
            placeholder.ds_shape = parameter.shape
            setattr(module, name, placeholder)
    tracker = FFNTracker(model, memory_budget_mb=1)
    assert [(site.site, dim) for site, dim in zip(tracker.sites, tracker._dims)] == [("ffn.0", 37), ("ffn.1", 37)]
