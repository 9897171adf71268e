"""A tiny GPT-2, a token dataset and a Trainer around them, shared by the callback tests and workers."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

SEQ_LEN = 9
VOCAB = 61


def tiny_gpt2_config(**overrides) -> GPT2Config:
    """The tests' GPT-2: 2 layers, odd FFN width 37, no dropout (so a forward can be recomputed exactly)."""
    options = dict(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=24,
        n_head=3,
        n_layer=2,
        n_inner=37,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    options.update(overrides)
    return GPT2Config(**options)


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    """A GPT-2 of :func:`tiny_gpt2_config` (``overrides`` change its fields), seeded."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config(**overrides))


def token_dataset(n: int, seed: int = 1) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ_LEN), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def training_args(output_dir, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        gradient_accumulation_steps=2,
        max_steps=6,
        learning_rate=5e-3,
        logging_steps=4,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def make_trainer(output_dir, callbacks, n_train: int = 16, n_eval: int = 6, model=None, **overrides) -> Trainer:
    return Trainer(
        model=model if model is not None else tiny_gpt2(),
        args=training_args(output_dir, **overrides),
        train_dataset=token_dataset(n_train, seed=1),
        eval_dataset=token_dataset(n_eval, seed=2),
        callbacks=callbacks,
    )
