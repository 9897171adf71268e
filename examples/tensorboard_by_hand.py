#!/usr/bin/env python
"""NerVE metrics logged to TensorBoard by hand with ``torch.utils.tensorboard.SummaryWriter``.

    python examples/tensorboard_by_hand.py --steps 6 --out runs/tb && tensorboard --logdir runs/tb

At each measured step the seven metrics of every FFN go to ``nerve/<site>/<metric>`` and their layer mean
to ``nerve/mean/<metric>`` (the keys ``NerveCallback`` uses), beside ``train/loss``. The values written are
also kept in ``<out>/nerve_metrics.jsonl``. Tiny GPT-2 from a config, random token ids: no downloads.
"""

import argparse
import contextlib
import json
import math
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from transformers import GPT2Config, GPT2LMHeadModel

from nerve_hf import FFNTracker
from nerve_hf.metrics import METRIC_NAMES


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/example_tensorboard", help="TensorBoard log directory")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps")
    parser.add_argument("--every", type=int, default=2, help="measure every N-th step")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_inner=37, n_positions=64, vocab_size=256, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = FFNTracker(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(log_dir=str(out))

    with open(out / "nerve_metrics.jsonl", "w") as sink:
        for step in range(1, args.steps + 1):
            input_ids = torch.randint(0, config.vocab_size, (4, 32))  # [batch, seq]
            measured = step % args.every == 0
            with tracker if measured else contextlib.nullcontext():  # hooks only on measured steps
                loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            writer.add_scalar("train/loss", loss.item(), step)
            if not measured:
                continue
            rows = tracker.compute().rows
            tracker.reset()  # the next measured step starts afresh
            for row in rows:
                for name in METRIC_NAMES:
                    writer.add_scalar(f"nerve/{row['site']}/{name}", float(row[name]), step)
            for name in METRIC_NAMES:
                values = [float(row[name]) for row in rows if not math.isnan(float(row[name]))]
                mean = sum(values) / len(values) if values else float("nan")
                writer.add_scalar(f"nerve/mean/{name}", mean, step)
            for row in rows:
                sink.write(json.dumps({"step": step, "site": row["site"], **{n: float(row[n]) for n in METRIC_NAMES}}))
                sink.write("\n")
    writer.close()


if __name__ == "__main__":
    main()
