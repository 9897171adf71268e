"""What the tracker options beyond the paper cost: flow, position buckets and cross-layer CKA.

The demo's GPT-2 (the ``full`` preset of ``scripts/demo.py``: 4 layers, n_embd 128, d_ff 512, context 128,
8 sequences per step, random tokens) trains with AdamW. Per variant, the same measured-step work as
NerveCallback does at a measured step: training steps (forward + backward + update) with the tracker
attached, then ``compute()``. Reported per variant (medians over repeats, variants interleaved):

* ``step_seconds``: a training step with the hooks recording (``none``: no tracker);
* ``compute_seconds``: one ``compute()`` (sync-free accumulation is flushed there on accelerators);
* ``event_seconds``: the cost of one measurement event, (step − plain step) + compute;
* ``vs_paper``: event cost relative to the paper's pre/post measurement (``base``);
* ``overhead_at_100``: event cost / (100 × plain step), the training overhead at ``every_n_steps=100``;
* ``state_mib``: the float64 state the tracker holds (the memory formula of docs/coherence.md).

On the CPU times are the process's CPU time (``time.process_time``), which other processes on a shared
machine disturb far less than wall time; run with ``--threads 1`` for stable numbers. On CUDA: wall time.

Run: ``python benchmarks/perf/coherence_cost.py --device auto [--quick] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from _common import REPO, add_common_args, apply_threads, devices, synchronize, write_result

from nerve_hf import FFNTracker

VARIANTS = {
    "none": None,
    "base": {},
    "flow": {"flow": True},
    "buckets4": {"position_buckets": [0, 16, 32, 64]},
    "cross_adjacent": {"cross_layer": "adjacent"},
    "all_three": {"flow": True, "position_buckets": [0, 16, 32, 64], "cross_layer": "adjacent"},
}


def build(device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    preset = json.loads((REPO / "scripts" / "demo_presets.json").read_text())["full"]
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=preset["n_layer"],
        n_embd=preset["n_embd"],
        n_head=preset["n_head"],
        n_positions=preset["block_size"],
        n_inner=4 * preset["n_embd"],
        vocab_size=preset["vocab_size"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config).to(device).train()
    return model, preset["batch_size"], preset["block_size"], preset["vocab_size"]


def state_mib(tracker: FFNTracker) -> float:
    window = tracker.window()
    accs = [acc for state in window.states for acc in (state.pre, state.post, state.input, state.output) if acc]
    accs += [acc for state in window.states for pair in state.buckets for acc in pair]
    total = sum((acc.dim * acc.dim + acc.dim) * 8 for acc in accs)
    total += sum((c.dim_x * c.dim_y + c.dim_x + c.dim_y) * 8 for c in window.cross.values())
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default: 5, 2 quick)")
    args = parser.parse_args()
    apply_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 5)
    steps = 2 if args.quick else 4
    for device in devices(args.device):
        model, batch, seq, vocab = build(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1)
        inputs = [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(steps)]
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)

        clock = time.process_time if device.type == "cpu" else time.perf_counter

        def train_steps(model=model, optimizer=optimizer, inputs=inputs, mask=mask):
            for ids in inputs:
                loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        train_steps()  # warm-up
        timings = {name: {"step": [], "compute": []} for name in VARIANTS}
        states = {}
        for _ in range(repeats):
            for name, options in VARIANTS.items():
                tracker = FFNTracker(model, **options) if options is not None else None
                synchronize(device)
                start = clock()
                if tracker is None:
                    train_steps()
                else:
                    with tracker:
                        train_steps()
                synchronize(device)
                timings[name]["step"].append((clock() - start) / steps)
                if tracker is not None:
                    start = clock()
                    tracker.compute()
                    synchronize(device)
                    timings[name]["compute"].append(clock() - start)
                    states[name] = state_mib(tracker)
        plain = statistics.median(timings["none"]["step"])
        results = {}
        for name in VARIANTS:
            if name == "none":
                continue
            step = statistics.median(timings[name]["step"])
            compute = statistics.median(timings[name]["compute"])
            # a measured optimizer step of the callback measures every micro-batch of that step: steps x batches
            event = (step - plain) * steps + compute
            results[name] = {
                "step_seconds": step,
                "compute_seconds": compute,
                "event_seconds": event,
                "overhead_at_100": event / (100 * plain),
                "state_mib": states[name],
            }
        for name in results:
            results[name]["vs_paper"] = results[name]["event_seconds"] / results["base"]["event_seconds"]
        payload = {
            "model": "demo full preset GPT-2 (4 x [128 -> 512 -> 128], context 128)",
            "tokens_per_measurement": steps * batch * seq,
            "plain_step_seconds": plain,
            "variants": results,
        }
        print(json.dumps(payload, indent=2))
        write_result(args.out, "coherence_cost", device, payload, args.quick)


if __name__ == "__main__":
    main()
