"""FSDP2 (``fully_shard`` per block and at the root) on gloo processes, two SGD steps on right-padded
batches with an attention mask, the tracker measuring both; beside it this worker's own hooks keep each
rank's FFN pre (``c_fc`` output) and post (``c_proj`` input) rows of the real tokens in float64. Writes
``rank<r>.json`` (the tracker's rows) and ``rank<r>.npz`` (the captured rows) to the output folder."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from distributed_helpers import capture_gpt2_ffn_rows, end_worker  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from trainer_helpers import VOCAB, tiny_gpt2  # noqa: E402

from nerve_hf import FFNTracker  # noqa: E402

LENGTHS = ((9, 4, 7, 2), (5, 9, 3, 8))  # real tokens of each sample of the two global batches, padded to 9


def batches():
    generator = torch.Generator().manual_seed(4)
    for lengths in LENGTHS:
        ids = torch.randint(1, VOCAB, (len(lengths), 9), generator=generator)
        mask = (torch.arange(9) < torch.tensor(lengths)[:, None]).long()  # [B, 9] right padding
        yield ids * mask, mask


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_gpt2()
    if world > 1:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    real = []  # the running call's [B, T] mask
    seen = capture_gpt2_ffn_rows(model, real)
    with FFNTracker(model, flow=False) as tracker:
        for ids, mask in batches():
            ids, mask = ids.chunk(world)[rank], mask.chunk(world)[rank]  # this process's share
            real.append(mask.bool())
            labels = ids.masked_fill(mask == 0, -100)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    rows = tracker.compute().rows
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    np.savez(Path(out, f"rank{rank}.npz"), **{k: torch.cat(v).detach().numpy() for k, v in seen.items()})
    del tracker, optimizer, model  # FSDP2 keeps reduce-scatter work objects on the model (see end_worker)
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
