"""Each process measures its share of a batch; writes its rows, eigvalsh work and bytes sent as JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for trainer_helpers

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from trainer_helpers import VOCAB, tiny_gpt2  # noqa: E402

import nerve_hf.spectra as spectra  # noqa: E402
from nerve_hf import FFNTracker  # noqa: E402


def main(out: str, n_layer: int, metrics: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    decomposed = []  # matrices per eigvalsh call on this process
    real_eigvalsh = torch.linalg.eigvalsh
    torch.linalg.eigvalsh = lambda m: decomposed.append(m.shape[0] if m.ndim == 3 else 1) or real_eigvalsh(m)
    sent = {"all_reduce": 0, "reduce_scatter": 0, "reduce": 0, "all_gather": 0}

    def counting(name, collective):
        def wrapped(*args, **kwargs):
            tensor = args[0] if name in ("all_reduce", "reduce") else args[1]  # what this process contributes
            sent[name] += tensor.numel() * tensor.element_size()
            return collective(*args, **kwargs)

        return wrapped

    dist.all_reduce = counting("all_reduce", dist.all_reduce)
    dist.reduce_scatter_tensor = counting("reduce_scatter", dist.reduce_scatter_tensor)
    dist.all_gather_into_tensor = counting("all_gather", dist.all_gather_into_tensor)
    dist.reduce = counting("reduce", dist.reduce)

    model = tiny_gpt2(n_layer=n_layer).double().eval()  # float64: exact activations, only the reduction differs
    ids = torch.randint(1, VOCAB, (8, 9), generator=torch.Generator().manual_seed(3))
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(input_ids=ids.chunk(world)[rank])
    report = tracker.compute(metrics=metrics)
    counted, own = dict(sent), list(decomposed)  # before the replicated reference below
    # the replicated path on the same statistics: every covariance all-reduced, every rank decomposes all
    from nerve_hf.stats.covariance import sync_accumulators

    pairs = [(state.pre, state.post) for state in tracker._states]
    sync_accumulators([acc for pair in pairs for acc in pair])
    replicated, _ = spectra.metric_values(pairs, metrics)
    eigenvalues = {site: [pre.tolist(), post.tolist()] for site, (pre, post) in report.eigenvalues.items()}
    Path(out, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rows": report.rows,
                "eigenvalues": eigenvalues,
                "decomposed": own,
                "sent": counted,
                "replicated": replicated,
            }
        )
    )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
