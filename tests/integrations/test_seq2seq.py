"""Encoder–decoder models under ``Seq2SeqTrainer``: each stack counts exactly its own tokens.

T5 (``wi``/``wo`` and gated ``wi_0``/``wi_1``) and BART are trained with the real collator
(``DataCollatorForSeq2Seq``: right-padded sources with an ``attention_mask``, labels padded with -100,
``decoder_input_ids`` shifted from the labels). An :class:`~nerve_hf.FFNTracker` is attached for the whole
run, beside an independent float64 capture of each FFN's own pre/post (``tests/stack_reference.py``):
encoder rows are the real source tokens, decoder rows the positions whose label is not -100. Token counts
are also checked against the dataset's own lengths.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from datasets import Dataset
from stack_reference import StackCapture, assert_site, decoder_rows, encoder_rows
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DataCollatorForSeq2Seq,
    LEDConfig,
    LEDForConditionalGeneration,
    PreTrainedTokenizerFast,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    T5Config,
    T5ForConditionalGeneration,
    T5GemmaConfig,
    T5GemmaForConditionalGeneration,
)

from nerve_hf import FFNTracker, NerveCallback

VOCAB, HIDDEN, LAYERS = 64, 32, 2
STEPS = 2  # each step one batch of every sample (no shuffling can change the padded lengths)
# (source length, target length) of each sample, eos included
UNEQUAL = ((11, 6), (7, 9), (9, 3), (5, 7), (10, 8), (6, 4), (8, 9), (4, 5))  # sources padded to 11, targets to 9
EQUAL = ((9, 6), (7, 9), (9, 3), (5, 7), (8, 8), (6, 4), (8, 9), (4, 5))  # both padded to 9


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``t0 .. t63`` (t0 is the pad token, t1 eos): only its padding is used."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    backend = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t2"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", eos_token="t1", unk_token="t2")


def dataset(lengths) -> Dataset:
    generator = torch.Generator().manual_seed(3)

    def ids(n: int) -> list[int]:
        return torch.randint(3, VOCAB, (n - 1,), generator=generator).tolist() + [1]

    pairs = [(ids(src), ids(tgt)) for src, tgt in lengths]
    return Dataset.from_dict({"input_ids": [s for s, _ in pairs], "labels": [t for _, t in pairs]})


def t5(gated: bool):
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=37, num_layers=LAYERS, num_heads=4, dropout_rate=0.0,
        feed_forward_proj="gated-gelu" if gated else "relu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )  # fmt: skip
    model = T5ForConditionalGeneration(config)
    pre = "wi_0" if gated else "wi"
    sites = {}
    for stack, ffn in (("encoder", 1), ("decoder", 2)):
        for i in range(LAYERS):
            base = f"{stack}.block.{i}.layer.{ffn}.DenseReluDense"
            sites[f"{stack}.ffn.{i}"] = (f"{base}.{pre}", f"{base}.wo")
    return model, sites


def bart():
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=2,
        eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=None,
    )  # fmt: skip
    model = BartForConditionalGeneration(config)
    sites = {
        f"{stack}.ffn.{i}": (f"model.{stack}.layers.{i}.fc1", f"model.{stack}.layers.{i}.fc2")
        for stack in ("encoder", "decoder")
        for i in range(LAYERS)
    }
    return model, sites


def led():
    """LED pads its sources inside the model to a multiple of its attention window (11 -> 12, 9 -> 12)."""
    torch.manual_seed(0)
    config = LEDConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=41, attention_window=[4] * LAYERS,
        max_encoder_position_embeddings=32, max_decoder_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, pad_token_id=0, bos_token_id=2, eos_token_id=1, decoder_start_token_id=1,
    )  # fmt: skip
    model = LEDForConditionalGeneration(config)
    sites = {
        f"{stack}.ffn.{i}": (f"led.{stack}.layers.{i}.fc1", f"led.{stack}.layers.{i}.fc2")
        for stack in ("encoder", "decoder")
        for i in range(LAYERS)
    }
    return model, sites


def t5gemma():
    torch.manual_seed(0)
    stack = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip
    config = T5GemmaConfig(
        encoder=stack, decoder={**stack, "intermediate_size": 41}, vocab_size=VOCAB, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, decoder_start_token_id=2,
    )  # fmt: skip
    model = T5GemmaForConditionalGeneration(config)
    sites = {
        f"{stack}.ffn.{i}": (f"model.{stack}.layers.{i}.mlp.gate_proj", f"model.{stack}.layers.{i}.mlp.down_proj")
        for stack in ("encoder", "decoder")
        for i in range(LAYERS)
    }
    return model, sites


MODELS = {
    "t5": lambda: t5(gated=False),
    "t5-gated": lambda: t5(gated=True),
    "bart": bart,
    "led": led,
    "t5gemma": t5gemma,
}


def train(model, lengths, tmp_path, **tracker_options):
    """Seq2SeqTrainer for STEPS steps with the tracker and the reference capture attached; the report."""
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(lengths), max_steps=STEPS, learning_rate=1e-2,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        logging_steps=1,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer(), model=model, label_pad_token_id=-100)
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=dataset(lengths), data_collator=collator)
    with FFNTracker(model, flow=False, **tracker_options) as tracker:
        trainer.train()
    return tracker.compute()


@pytest.mark.parametrize("lengths", [UNEQUAL, EQUAL], ids=["unequal-lengths", "equal-lengths"])
@pytest.mark.parametrize("family", list(MODELS))
def test_each_stack_counts_its_own_tokens(family, lengths, tmp_path):
    model, sites = MODELS[family]()
    capture = StackCapture(model, sites)
    report = train(model, lengths, tmp_path)
    capture.remove()
    # rows in module order, encoder first: exactly the dataset's own lengths (each step sees every sample once)
    src, tgt = (STEPS * sum(n) for n in zip(*lengths))
    assert [row["tokens"] for row in report.rows] == [src] * LAYERS + [tgt] * LAYERS
    assert [row["site"] for row in report.rows] == list(sites)
    for row in report.rows:
        stack = row["site"].split(".")[0]
        assert row["stack"] == stack and row["layer"] == int(row["site"].rsplit(".", 1)[1])
        pre, post = capture.rows(row["site"], encoder_rows if stack == "encoder" else decoder_rows)
        assert_site(row, pre, post)


def test_t5_layers_are_block_indices_within_each_stack(tmp_path):
    model, sites = t5(gated=True)
    capture = StackCapture(model, sites)
    report = train(model, UNEQUAL, tmp_path, layers=[0])
    capture.remove()
    assert [row["site"] for row in report.rows] == ["encoder.ffn.0", "decoder.ffn.0"]
    for row in report.rows:
        select = encoder_rows if row["stack"] == "encoder" else decoder_rows
        assert_site(row, *capture.rows(row["site"], select))


def test_nerve_callback_logs_each_stacks_own_tokens(tmp_path):
    """The callback under Seq2SeqTrainer, every step measured: each step's records against the capture of
    that step's one forward (equal source and target lengths: the case that used to pick wrong rows)."""
    model, sites = bart()
    capture = StackCapture(model, sites)
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(EQUAL), max_steps=STEPS, learning_rate=1e-2,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
        logging_steps=1,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer(), model=model, label_pad_token_id=-100)
    callback = NerveCallback(every_n_steps=1, flow=False)
    trainer = Seq2SeqTrainer(
        model=model, args=args, train_dataset=dataset(EQUAL), data_collator=collator, callbacks=[callback]
    )
    trainer.train()
    capture.remove()
    records = [json.loads(line) for line in (tmp_path / "nerve_metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train" and r["site"] in sites]
    assert sorted({r["step"] for r in train}) == list(range(1, STEPS + 1))
    for record in train:
        assert record["stack"] == record["site"].split(".")[0]
        select = encoder_rows if record["stack"] == "encoder" else decoder_rows
        assert_site(record, *capture.rows(record["site"], select, calls={record["step"] - 1}))


def generating_evaluator(model, tmp_path, callbacks=()):
    """Seq2SeqTrainer(predict_with_generate=True) over the UNEQUAL set, two batches, beam search: every
    batch runs generate (encoder as a submodule, decoder steps without labels) and then the teacher-forced
    forward with labels."""
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=len(UNEQUAL) // 2, predict_with_generate=True,
        generation_max_length=6, generation_num_beams=2, report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    collator = DataCollatorForSeq2Seq(tokenizer(), model=model, label_pad_token_id=-100)
    return Seq2SeqTrainer(
        model=model, args=args, eval_dataset=dataset(UNEQUAL), data_collator=collator,
        compute_metrics=lambda prediction: {"generated": float(prediction.predictions.shape[-1])},
        callbacks=list(callbacks),
    )  # fmt: skip


def teacher_forced(capture: StackCapture) -> set[int]:
    """The top-level calls that carry labels: the teacher-forced forwards."""
    return {i for i, call in enumerate(capture.calls) if call.get("labels") is not None}


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_predict_with_generate_measures_the_teacher_forced_forward(family, tmp_path):
    """generate's decoder steps read generated tokens (2 beams, one cached token a step): they are not the
    evaluation's target tokens and count nothing; the teacher-forced forward counts exactly its own."""
    model, sites = MODELS[family]()
    capture = StackCapture(model, sites)
    trainer = generating_evaluator(model, tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with FFNTracker(model, flow=False, when=lambda m: not m.training) as tracker:
            metrics = trainer.evaluate()
    capture.remove()
    assert metrics["eval_generated"] > 1  # generate ran
    assert len(capture.calls) > 2 * len(teacher_forced(capture)) == 4  # and its decoder steps were calls
    src, tgt = (sum(n) for n in zip(*UNEQUAL))
    report = tracker.compute()
    assert [row["tokens"] for row in report.rows] == [src] * LAYERS + [tgt] * LAYERS
    assert not [w for w in seen if "FFNTracker" in str(w.message)]  # nothing to warn about
    for row in report.rows:
        select = encoder_rows if row["stack"] == "encoder" else decoder_rows
        assert_site(row, *capture.rows(row["site"], select, calls=teacher_forced(capture)))


def test_predict_with_generate_under_the_callback(tmp_path):
    """NerveCallback's eval records of a predict_with_generate evaluation: the teacher-forced forwards only."""
    model, sites = bart()
    capture = StackCapture(model, sites)
    trainer = generating_evaluator(model, tmp_path, [NerveCallback(flow=False)])
    trainer.evaluate()
    capture.remove()
    records = [json.loads(line) for line in (tmp_path / "nerve_metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval" and r["site"] in sites]
    assert [r["site"] for r in evals] == list(sites)
    for record in evals:
        select = encoder_rows if record["stack"] == "encoder" else decoder_rows
        assert_site(record, *capture.rows(record["site"], select, calls=teacher_forced(capture)))


def test_led_without_a_mask_counts_every_given_token_and_none_of_its_window_padding():
    """LED pads a source of 11 tokens to 12 (its attention window 4) inside the model, mask or no mask."""
    model, sites = led()
    model.eval()
    capture = StackCapture(model, sites)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 11), generator=generator)
    targets = torch.randint(3, VOCAB, (2, 5), generator=generator)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        model(input_ids=ids, decoder_input_ids=targets)
    capture.remove()
    report = tracker.compute()
    assert [row["tokens"] for row in report.rows] == [22] * LAYERS + [10] * LAYERS
    for row in report.rows:
        stack = row["site"].split(".")[0]

        def given(call, x, stack=stack):  # the reference: the call's own tokens, never the model's padding
            return (
                None
                if stack == "decoder"
                else torch.arange(x.shape[1]).expand(x.shape[:2]) < call["input_ids"].shape[1]
            )

        assert_site(row, *capture.rows(row["site"], given))
