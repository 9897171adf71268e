"""Routed experts under 2 gloo processes, each rank half of a padded batch; rank 0 saves the report."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.tracking

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from nerve_hf import FFNTracker  # noqa: E402
from tests.tracking.test_experts import _build  # noqa: E402

LENGTHS = (11, 6, 9, 3, 11, 8)  # uneven real tokens per sample


def batch() -> dict:
    """Six right-padded sequences of the tiny Mixtral's vocabulary."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 61, (len(LENGTHS), 11), generator=generator)
    mask = torch.tensor([[1] * n + [0] * (11 - n) for n in LENGTHS])
    return {"input_ids": ids, "attention_mask": mask}


def model():
    return _build("mixtral", "eager").double()  # float64: the same activations on any batch split (eager: the
    # grouped_mm default takes no float64); only the reduction differs


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    half = slice(0, 3) if rank == 0 else slice(3, 6)
    inputs = {key: value[half] for key, value in batch().items()}
    net = model()
    tracker = FFNTracker(net, flow=False)
    with tracker, torch.no_grad():
        net(**inputs)
    report = tracker.compute()
    sharded = FFNTracker(net, flow=False, site_sharded=True)  # each rank owns some MoE layers, on its own tokens
    with sharded, torch.no_grad():
        net(**inputs)
    by_site = sharded.compute()
    if rank == 0:
        saved = {"rows": report.rows, "routing": report.routing}
        saved.update(sharded_rows=by_site.rows, sharded_routing=by_site.routing)
        torch.save(saved, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
