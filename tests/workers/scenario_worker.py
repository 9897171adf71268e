"""Every scenario of ``tests/scenarios.py`` on this process's share of the batch, measured twice: with the
statistics summed over the processes and site-sharded; each rank writes its reports as rank<r>.json."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for scenarios

import torch.distributed as dist  # noqa: E402
from scenarios import SCENARIOS, build_model, make_batch, report_dict, run_tracker, split  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    share = split(make_batch(), world)[rank]
    results = {}
    for scenario in SCENARIOS:
        model = build_model(scenario.family)
        results[scenario.name] = {
            "summed": report_dict(run_tracker(model, scenario, share)),
            "site_sharded": report_dict(run_tracker(model, scenario, share, site_sharded=True, state_device="cpu")),
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
