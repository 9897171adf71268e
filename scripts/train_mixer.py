#!/usr/bin/env python
"""Train an MLP-Mixer image classifier with the Hugging Face Trainer, optionally watching NerVE spectra.

The model wrapper, metrics and Trainer wiring live in ``nerve_zoo.image_training`` (shared with
``benchmarks/run.py mixer``); this file parses flags and runs one training. Offline by default:
scikit-learn's digits; ``--dataset cifar100 --data_dir DIR`` reads a local ``cifar-100-python`` directory
(or the Hub's ``uoft-cs/cifar100`` when DIR has none).

    python scripts/train_mixer.py --output_dir runs/mixer --variant mixer-relu-gelu --optimizer sgd --lr 0.05 \\
        --epochs 10 --nerve
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger("train_mixer")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="Where Trainer logs and nerve_metrics.jsonl go.")
    parser.add_argument(
        "--variant", default="mixer-gelu-gelu", help="nerve_zoo Mixer variant (mixer-<token>-<channel>)."
    )
    parser.add_argument("--size", default="tiny", help="Zoo Mixer size: tiny, cpu or paper (Mixer-B/16).")
    parser.add_argument("--dataset", default="digits", choices=["digits", "cifar100"], help="Image set.")
    parser.add_argument("--data_dir", default=None, help="Local cifar-100-python directory (cifar100 only).")
    parser.add_argument("--image_size", type=int, default=16, help="Side images are resized to (224 for Mixer-B/16).")
    parser.add_argument(
        "--optimizer", default="adam", choices=["sgd", "adam", "adamw", "muon", "dion"], help="Optimizer."
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Peak learning rate (cosine schedule).")
    parser.add_argument("--weight_decay", type=float, default=0.0, help="Weight decay on >= 2-D tensors.")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per device and step.")
    parser.add_argument("--epochs", type=float, default=10, help="Passes over the training set.")
    parser.add_argument("--eval_steps", type=int, default=50, help="Steps between evaluations (and eval spectra).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for init and data order.")
    parser.add_argument("--nerve", action="store_true", help="Measure NerVE spectra of both FFNs at every evaluation.")
    parser.add_argument("--nerve_max_tokens", type=int, default=None, help="Tokens per FFN per spectrum (None: all).")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import TrainingArguments, set_seed

    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # nerve_zoo is not installed: it lives in the checkout
    import nerve_zoo as zoo
    from nerve_zoo.image_training import MixerForImageClassification, build_trainer, nerve_callback

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_seed(args.seed)
    splits = zoo.load_image_dataset(args.dataset, image_size=args.image_size, seed=args.seed, data_dir=args.data_dir)
    mixer = zoo.build_model(args.variant, size=args.size, num_classes=splits.num_classes, img_size=args.image_size)
    model = MixerForImageClassification(mixer)
    optimizer = zoo.build_optimizer(args.optimizer, model, lr=args.lr, weight_decay=args.weight_decay)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        eval_strategy="steps",
        eval_steps=args.eval_steps,
        logging_steps=args.eval_steps,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    callbacks = [nerve_callback(model, args.eval_steps, args.nerve_max_tokens)] if args.nerve else []
    trainer = build_trainer(model, splits.train, splits.val, training_args, optimizer, callbacks)
    trainer.train()
    metrics = trainer.evaluate()
    logger.info("final: %s", json.dumps({k: v for k, v in metrics.items() if not k.startswith("eval_nerve")}))
    return metrics


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    main()
