"""Flow, position buckets and cross-layer CKA under 2 gloo processes, uneven shares; rank 0 saves the results."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from trainer_helpers import VOCAB, tiny_gpt2  # noqa: E402

from nerve_hf import FFNTracker  # noqa: E402
from nerve_hf.stats.cross_covariance import CrossCovarianceAccumulator  # noqa: E402


def forwards() -> list[dict]:
    """Three padded forwards of the tiny GPT-2 (the one-process reference runs all of them)."""
    generator = torch.Generator().manual_seed(5)
    out = []
    for lengths in ((9, 4, 7), (6, 9), (3, 8, 9, 5)):
        ids = torch.randint(1, VOCAB, (len(lengths), 9), generator=generator)
        mask = torch.zeros(len(lengths), 9, dtype=torch.long)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def tracker_options() -> dict:
    return dict(flow=True, position_buckets=[0, 3, 6], cross_layer="adjacent")


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(501, 9, generator=generator, dtype=torch.float64) + 4.0
    y = torch.randn(501, 6, generator=generator, dtype=torch.float64) + x[:, :6]
    bounds = [0, 170, 501]
    acc = CrossCovarianceAccumulator(9, 6)
    for start in range(bounds[rank], bounds[rank + 1], 53):
        stop = min(start + 53, bounds[rank + 1])
        acc.update(x[start:stop], y[start:stop])
    acc.sync()
    acc.sync()  # a second sync must not count rows twice
    local_kept = acc._n == bounds[rank + 1] - bounds[rank]

    model = tiny_gpt2(seed=0).double().eval()  # float64: exact activations, only the reduction differs
    tracker = FFNTracker(model, **tracker_options())
    mine = forwards()[:2] if rank == 0 else forwards()[2:]  # whole forwards: uneven token shares
    with tracker, torch.no_grad():
        for inputs in mine:
            model(**inputs)
    report = tracker.compute()
    if rank == 0:
        torch.save(
            {
                "count": acc.count,
                "cross": acc.cross_covariance(),
                "local_kept": local_kept,
                "rows": report.rows,
                "positions": report.positions,
                "cross_layer": report.cross_layer,
            },
            out_path,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
