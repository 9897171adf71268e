"""Each rank feeds a different, uneven share of the same rows; rank 0 saves the synced state."""

import sys

import torch
import torch.distributed as dist

from nerve_hf.stats.covariance import CovarianceAccumulator, sync_accumulators


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(1001, 23, generator=generator, dtype=torch.float64) * 0.5 + 7.0  # [N, 23]
    wide = torch.randn(640, 40, generator=generator)  # [N, 40] fp32
    bounds = [0, 300, 1001]  # uneven shares
    share = rows[bounds[rank] : bounds[rank + 1]]
    first = CovarianceAccumulator(23)
    for chunk in share.split(97):
        first.update(chunk)
    second = CovarianceAccumulator(40)
    if rank == 1:  # rank 0 sees none of these rows
        second.update(wide)
    empty = CovarianceAccumulator(5)  # no rows anywhere
    sync_accumulators([first, second, empty])
    first.sync()  # a second sync must not count rows twice
    local_count_kept = first._n == share.shape[0]
    if rank == 0:
        torch.save(
            {
                "count": first.count,
                "cov": first.covariance(),
                "mean": first.mean(),
                "count_wide": second.count,
                "cov_wide": second.covariance(),
                "empty_count": empty.count,
                "empty_eig_nan": bool(torch.isnan(empty.eigenvalues()).all()),
                "local_count_kept": local_count_kept,
                "world": world,
            },
            out_path,
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
