"""Site-sharded measurement: each process measures its own FFNs on its own tokens; rows as JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from trainer_helpers import VOCAB, tiny_gpt2  # noqa: E402

from nerve_hf import FFNTracker  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_gpt2(n_layer=3).double().eval()
    ids = torch.randint(1, VOCAB, (8, 9), generator=torch.Generator().manual_seed(3)).chunk(world)[rank]
    sharded = FFNTracker(model, site_sharded=True, state_device="cpu", memory_budget_mb=0.05, flow=False)
    alone, _ = dist.new_subgroups(group_size=1)
    local = FFNTracker(model, group=alone, flow=False)  # every FFN on this process's tokens only, for reference
    more = dict(flow=True, position_buckets=[0, 4])  # the owner measures the stages and buckets too
    sharded_more = FFNTracker(model, site_sharded=True, state_device="cpu", **more)
    local_more = FFNTracker(model, group=alone, **more)
    with sharded, local, sharded_more, local_more, torch.no_grad():
        model(input_ids=ids)
    owned = [i for i in range(3) if sharded._owns(i)]
    devices = sorted({str(sharded._states[i].pre.device) for i in owned})
    result = {"rows": sharded.compute().rows, "local": local.compute().rows, "owned": owned, "devices": devices}
    for name, tracker in (("more", sharded_more), ("local_more", local_more)):
        report = tracker.compute()
        result[name] = {
            "rows": report.rows,
            "positions": report.positions,
            "bucket_spectra": {
                f"{s}/{b}": torch.cat(pair).tolist() for (s, b), pair in report.position_eigenvalues.items()
            },
            "flow_spectra": {site: torch.cat(pair).tolist() for site, pair in report.flow_eigenvalues.items()},
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
