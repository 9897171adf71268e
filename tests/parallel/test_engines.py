"""Large-model engines. FSDP: the Trainer cannot run it on CPU (accelerate enables its FSDP plugin only for accelerator
back ends; on CPU processes it trains with DDP instead), so the closest case that can run is tested:
a hand-written loop under FSDP2 ``fully_shard`` on 2 gloo processes equals 1 process on the same
global batches, and on padded batches its token count and metrics equal a float64 capture of both ranks'
own FFN rows (accelerate sets ``DistributedType.FSDP`` only for accelerator back ends, never for
``MULTI_CPU``: accelerate/state.py, so neither the Trainer nor ``Accelerator.prepare`` shards on CPU).
The Trainer's own data-parallel path is tested in test_callback and test_faults_training.
DeepSpeed ZeRO-3 runs on CPU processes: DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``) falls back
to gloo without Intel's oneCCL bindings, and the Trainer with ``use_cpu=True`` sees both processes (without
it, accelerate counts one process and each rank trains on the same samples). The Trainer with a ZeRO-3
config and a torch optimizer is tested against float64 captures; and that the tracker never reads a
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


@pytest.mark.distributed
def test_fsdp2_tokens_and_metrics_equal_a_float64_capture(tmp_path):
    """FSDP2 on 2 gloo processes, padded batches with an attention mask: every rank's rows count the real
    tokens of the whole global batches, once, and their PR/SE equal a float64 capture of both ranks' own
    FFN rows (this file's hooks, in the worker), concatenated."""
    import numpy as np
    from reference import activation_metrics

    torchrun("fsdp_capture.py", str(tmp_path), nproc=2)
    captured = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(2)]
    for rank in range(2):
        rows = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert [r["site"] for r in rows] == ["ffn.0", "ffn.1"]
        for i, row in enumerate(rows):
            pre, post = (np.concatenate([c[f"{i}.{stage}"] for c in captured]) for stage in ("pre", "post"))
            assert row["tokens"] == pre.shape[0] == post.shape[0] == 47  # fsdp_capture.LENGTHS summed
            expected = activation_metrics(pre, post)
            for name in METRIC_NAMES:
                assert row[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), (rank, row["site"], name)


@pytest.mark.distributed
def test_deepspeed_zero3_trainer_on_two_cpu_processes_equals_a_float64_capture(tmp_path):
    """The Trainer under DeepSpeed ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator over gloo, a torch
    AdamW): parameters are partitioned, the FFN activations the hooks see are full. The callback's one
    measured step counts the real tokens of the global batch once, and its PR/SE equal (1) a float64 capture
    of both ranks' own FFN rows and (2) a single process's float64 capture of the same model on the same
    four sequences, without DeepSpeed."""
    import numpy as np
    import torch
    from reference import activation_metrics
    from trainer_helpers import tiny_gpt2

    from nerve_hf.sinks.records import read_records

    torchrun("deepspeed_zero3.py", str(tmp_path), nproc=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"processes": 2, "partitioned": True}
    captured = [np.load(tmp_path / f"rank{rank}.npz") for rank in range(2)]
    data = np.load(tmp_path / "data.npz")
    mask = torch.from_numpy(data["mask"]).bool()  # [4, 9]
    model, alone = tiny_gpt2().eval(), {}
    for i, block in enumerate(model.transformer.h):
        block.mlp.c_fc.register_forward_hook(lambda m, a, y, k=f"{i}.pre": alone.update({k: y[mask].double()}))
        block.mlp.c_proj.register_forward_pre_hook(lambda m, a, k=f"{i}.post": alone.update({k: a[0][mask].double()}))
    with torch.no_grad():
        model(input_ids=torch.from_numpy(data["input_ids"]), attention_mask=mask.long())
    records = [r for r in read_records(tmp_path / "nerve_metrics.jsonl") if r["split"] == "train"]
    assert [(r["site"], r["step"]) for r in records] == [("ffn.0", 1), ("ffn.1", 1)]
    for i, record in enumerate(records):
        pre, post = (np.concatenate([c[f"{i}.{stage}"] for c in captured]) for stage in ("pre", "post"))
        assert record["tokens"] == pre.shape[0] == alone[f"{i}.pre"].shape[0] == 22  # deepspeed_zero3.LENGTHS summed
        ranks = activation_metrics(pre, post)
        single = activation_metrics(alone[f"{i}.pre"].numpy(), alone[f"{i}.post"].numpy())
        for name in METRIC_NAMES:
            assert record[name] == pytest.approx(ranks[name], rel=1e-5, abs=1e-7), (record["site"], name)
            assert record[name] == pytest.approx(single[name], rel=1e-5, abs=1e-7), (record["site"], name)
