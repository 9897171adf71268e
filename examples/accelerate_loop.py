#!/usr/bin/env python
"""NerVE in an ``accelerate`` training loop, on any number of processes.

    torchrun --standalone --nproc_per_node 2 examples/accelerate_loop.py --cpu --steps 4 --out runs/accel
    accelerate launch --num_processes 2 examples/accelerate_loop.py --steps 4 --out runs/accel  # GPUs

``FFNTracker.compute`` is collective: every rank calls it, the covariance statistics of all ranks' tokens
are summed exactly, and every rank gets the same rows. Each rank writes them to ``<out>/rank<i>.jsonl`` and
rank 0 prints them. Tiny GPT-2 from a config, random token ids: nothing is downloaded.
"""

import argparse
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from nerve_hf import FFNTracker
from nerve_hf.metrics import METRIC_NAMES


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_accelerate", help="directory for rank<i>.jsonl")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps")
    parser.add_argument("--every", type=int, default=2, help="measure every N-th step")
    parser.add_argument("--cpu", action="store_true", help="run on CPU processes (gloo), even with GPUs")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    torch.manual_seed(0)  # same weights and data on every rank; the dataloader gives each rank its share
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_inner=37, n_positions=64, vocab_size=256, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    data = TensorDataset(torch.randint(0, config.vocab_size, (4 * args.steps * accelerator.num_processes, 32)))
    loader = DataLoader(data, batch_size=4)  # per process
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    tracker = FFNTracker(model)  # resolves the FFNs on the unwrapped model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    records = []
    model.train()
    for step, (input_ids,) in enumerate(loader, start=1):
        measured = step % args.every == 0
        if measured:
            tracker.reset()
            tracker.attach()
        try:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        finally:
            tracker.detach()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        if measured:
            for row in tracker.compute().rows:  # collective: every rank calls it
                record = {"step": step, "site": row["site"], "tokens": row["tokens"]}
                record.update({name: float(row[name]) for name in METRIC_NAMES})
                records.append(record)
                if accelerator.is_main_process:
                    print(json.dumps(record))
    rank_file = out / f"rank{accelerator.process_index}.jsonl"
    rank_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    accelerator.wait_for_everyone()  # no rank tears the process group down while another still uses it
    accelerator.end_training()


if __name__ == "__main__":
    main()
