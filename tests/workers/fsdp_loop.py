"""A hand-written training loop under FSDP2 (fully_shard per block and at the root) with the tracker
measuring the second step; with one process the same loop runs unsharded on the whole global batch."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from distributed_helpers import end_worker  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from trainer_helpers import VOCAB, tiny_gpt2  # noqa: E402

from nerve_hf import FFNTracker  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_gpt2().double()  # float64: the sharded and unsharded runs differ only by reduction order
    if world > 1:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randint(1, VOCAB, (4, 9), generator=generator) for _ in range(2)]  # global batches
    tracker = FFNTracker(model)
    for step, batch in enumerate(batches, start=1):
        ids = batch.chunk(world)[rank]  # this process's share of the global batch
        if step == 2:
            tracker.attach()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    tracker.detach()
    rows = tracker.compute().rows
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows))
    del tracker, optimizer, model  # FSDP2 keeps reduce-scatter work objects on the model (see end_worker)
    end_worker()


if __name__ == "__main__":
    main(sys.argv[1])
