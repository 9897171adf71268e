"""A LLaMA whose MLPs are tensor-parallel (colwise gate/up, rowwise down) on every process; the tracker's
rows, and the unsharded model's rows on the same tokens, as JSON (rank 0)."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import LlamaConfig, LlamaForCausalLM

from nerve_hf import FFNTracker


def tiny_llama(intermediate: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=24,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=2,  # transformers' tp_plan shards the heads too
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).double().eval()  # float64: the two paths differ only by the gather


def rows(model, ids, mask, group=None) -> list[dict]:
    tracker = FFNTracker(model, group=group)
    with tracker, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return tracker.compute().rows


def main(out: str, intermediate: int, how: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    ids = torch.randint(1, 61, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding still excluded
    alone, _ = dist.new_subgroups(group_size=1)  # the unsharded reference: this process's tokens only
    reference = rows(tiny_llama(intermediate), ids, mask, group=alone)
    if how == "tp_plan":  # transformers' own tensor-parallel loading of a saved checkpoint
        if dist.get_rank() == 0:
            tiny_llama(intermediate).save_pretrained(Path(out) / "model")
        dist.barrier()
        model = LlamaForCausalLM.from_pretrained(Path(out) / "model", tp_plan="auto", dtype=torch.float64).eval()
    else:  # torch's parallelize_module with the same plan
        model = tiny_llama(intermediate)
        plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()}
        for layer in model.model.layers:
            parallelize_module(layer.mlp, mesh, plan)
    sharded = rows(model, ids, mask)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"reference": reference, "sharded": sharded}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
