"""Probe throughput: tokens/s of a plain forward vs a forward under FFNTracker, GPT-2-small shape.

The model is GPT-2 small's shape built from a config (12 layers, n_embd 768, d_ff 3072, random
weights; nothing is downloaded). Timed with ``torch.utils.benchmark.Timer.blocked_autorange`` in
alternating rounds:

* ``plain``: ``model(input_ids)`` under ``torch.no_grad()``.
* ``tracked``: the same forward inside ``with tracker:`` with all 12 FFNs hooked, i.e. 24
  covariance updates of D = 3072 per forward (the tracker accumulates across calls, as a probe does).
* ``compute``: one ``tracker.compute()`` (sync + 24 float64 eigendecompositions of 3072 x 3072,
  batched; timed once) and ``tracker.compute(metrics="pr")`` (trace identity, no eigendecomposition).

Reported: tokens/s of each, ``overhead`` = tracked_time / plain_time - 1, and the forward FLOPs that
the covariance GEMMs add (2 x 2 x D^2 per token per FFN vs ~2 x 12 x n_embd^2 per token per layer).

Run: ``python benchmarks/perf/probe_throughput.py --device auto [--quick]``
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import add_common_args, apply_threads, devices, synchronize, write_result
from torch.utils.benchmark import Timer

from nerve_hf.tracking.tracker import FFNTracker, covariance_state_bytes

SHAPE = dict(n_layer=12, n_embd=768, n_head=12, n_inner=3072, n_positions=1024, vocab_size=50257)


def build(device: torch.device, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**SHAPE, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def bench(device: torch.device, dtype_name: str, quick: bool) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    model = build(device, dtype)
    if device.type == "cuda":
        batch, seq = (4, 512) if quick else (8, 1024)
    else:
        batch, seq = (1, 128) if quick else (2, 256)
    ids = torch.randint(
        0, SHAPE["vocab_size"], (batch, seq), device=device, generator=torch.Generator(device=device).manual_seed(0)
    )
    tracker = FFNTracker(model)
    env = {"model": model, "ids": ids, "tracker": tracker, "torch": torch}
    stmts = {
        "plain": "with torch.no_grad():\n    model(ids)",
        "tracked": "with tracker, torch.no_grad():\n    model(ids)",
    }
    for stmt in stmts.values():
        exec(stmt, env)  # warm-up (allocates the tracker's state)
    synchronize(device)
    rounds, min_run_time = (2, 0.5) if quick else (5, 1.5)
    times = {name: [] for name in stmts}
    for r in range(rounds):
        for name in stmts if r % 2 == 0 else reversed(list(stmts)):
            times[name].append(
                Timer(stmts[name], globals=env, num_threads=torch.get_num_threads())
                .blocked_autorange(min_run_time=min_run_time)
                .median
            )
    # compute() is timed once: 24 float64 eigendecompositions of 3072 x 3072 take ~1.5 min on 2 CPU cores.
    if device.type == "cuda":
        torch.linalg.eigvalsh(torch.eye(8, dtype=torch.float64, device=device))  # initialise cuSOLVER
    env["result"] = {}
    compute_all = (
        Timer("result['report'] = tracker.compute()", globals=env, num_threads=torch.get_num_threads()).timeit(1).median
    )
    report = env["result"]["report"]
    compute_pr = (
        Timer('tracker.compute(metrics="pr")', globals=env, num_threads=torch.get_num_threads())
        .blocked_autorange(min_run_time=0.1 if quick else 1.0)
        .median
    )
    tokens = batch * seq
    plain, tracked = statistics.median(times["plain"]), statistics.median(times["tracked"])
    d, n_embd = SHAPE["n_inner"], SHAPE["n_embd"]
    result = {
        "dtype": dtype_name,
        "batch": batch,
        "seq_len": seq,
        "tokens_per_forward": tokens,
        "plain_s": times["plain"],
        "tracked_s": times["tracked"],
        "plain_tokens_per_s": tokens / plain,
        "tracked_tokens_per_s": tokens / tracked,
        "overhead": tracked / plain - 1,
        "per_round_overhead": [t / p - 1 for t, p in zip(times["tracked"], times["plain"])],
        "compute_all_s": compute_all,
        "compute_pr_only_s": compute_pr,
        "covariance_state_mib": covariance_state_bytes([d] * SHAPE["n_layer"]) / 2**20,
        "covariance_flops_over_model_flops": (2 * 2 * d * d)
        / (2 * 12 * n_embd * n_embd + 2 * n_embd * SHAPE["vocab_size"] / SHAPE["n_layer"]),
        "mean_pr_pre": report.mean()["pr_pre"],
        "tokens_in_tracker": report.rows[0]["tokens"],
    }
    print(
        f"{device.type} {dtype_name} {tokens} tokens/forward: plain {result['plain_tokens_per_s']:,.0f} tok/s, "
        f"tracked {result['tracked_tokens_per_s']:,.0f} tok/s (overhead {100 * result['overhead']:+.0f}%), "
        f"compute {compute_all:.2f} s (PR only {compute_pr:.3f} s)",
        flush=True,
    )
    del tracker, model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    for device in devices(args.device):
        dtypes = ["fp32"] if device.type == "cpu" else ["fp32", "bf16"]
        rows = [bench(device, dtype_name, args.quick) for dtype_name in dtypes]
        write_result(args.out, "probe_throughput", device, {"model_shape": SHAPE, "results": rows}, args.quick)


if __name__ == "__main__":
    main()
