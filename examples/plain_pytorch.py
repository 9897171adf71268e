#!/usr/bin/env python
"""NerVE in a plain PyTorch training loop: attach ``FFNTracker`` on measured steps, compute, print.

    python examples/plain_pytorch.py --steps 6 --every 2 --out runs/plain

Each measured step prints one JSON line per FFN (step, site, tokens and the seven metrics) and appends it
to ``<out>/nerve_metrics.jsonl``. The model is a tiny GPT-2 built from a config; the data are random token
ids, so nothing is downloaded.
"""

import argparse
import json
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nerve_hf import FFNTracker
from nerve_hf.metrics import METRIC_NAMES


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_plain", help="directory for nerve_metrics.jsonl")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps")
    parser.add_argument("--every", type=int, default=2, help="measure every N-th step")
    parser.add_argument("--seed", type=int, default=0, help="random seed (model and data)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_inner=37, n_positions=64, vocab_size=256, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = FFNTracker(model)  # every FFN; the hooks exist only inside `with tracker:`
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with open(out / "nerve_metrics.jsonl", "w") as sink:
        for step in range(1, args.steps + 1):
            input_ids = torch.randint(0, config.vocab_size, (4, 32))  # [batch, seq]
            measured = step % args.every == 0
            if measured:
                tracker.reset()  # a new measurement: this step's forward pass only
                tracker.attach()
            try:
                loss = model(input_ids=input_ids, labels=input_ids).loss
            finally:
                tracker.detach()  # a no-op on unmeasured steps
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if measured:
                for row in tracker.compute().rows:
                    record = {"step": step, "loss": loss.item(), "site": row["site"], "tokens": row["tokens"]}
                    record.update({name: float(row[name]) for name in METRIC_NAMES})
                    print(json.dumps(record))
                    sink.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
