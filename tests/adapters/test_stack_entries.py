"""Every table entry with several stacks (or a vision tower), from a tiny config: one padded forward, each
row against an independent float64 capture of its FFN's own pre/post over its stack's real rows.

The module paths below are read from the installed transformers modeling files, written out here
rather than asked of the library. The forwards that training tools run (Seq2SeqTrainer, Trainer, the
vision–language coincidences) are in ``tests/integrations/test_seq2seq.py`` and ``tests/tracking/test_stacks.py``.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from stack_reference import StackCapture, all_rows, assert_site, decoder_rows, encoder_rows

from nerve_hf import FFNTracker

H, V = 32, 64
SMALL = dict(hidden_size=H, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
SEQ2SEQ = dict(vocab_size=V, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=41, max_position_embeddings=32,
               pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, dropout=0.0)  # fmt: skip
T5 = dict(
    vocab_size=V, d_model=H, d_kv=8, d_ff=37, num_layers=2, num_heads=2, dropout_rate=0.0, decoder_start_token_id=0
)


def text_rows(call, x):
    return call["attention_mask"] != 0


def _padded(batch: int, length: int, lengths, generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, V, (batch, length), generator=generator)
    mask = (torch.arange(length) < torch.tensor(lengths)[:, None]).long()  # right padding
    return ids.masked_fill(mask == 0, 0), mask


def seq2seq_inputs(generator, source_length: int = 9):
    ids, mask = _padded(3, source_length, [9, 5, 7][:3], generator)
    targets, target_mask = _padded(3, 6, [6, 2, 4], generator)
    return dict(input_ids=ids, attention_mask=mask, labels=targets.masked_fill(target_mask == 0, -100))


def fc_sites(prefix: str) -> dict:
    return {f"{stack}.ffn.{i}": (f"{prefix}{stack}.layers.{i}.fc1", f"{prefix}{stack}.layers.{i}.fc2")
            for stack in ("encoder", "decoder") for i in range(2)}  # fmt: skip


def t5_sites(pre: str) -> dict:
    return {f"{stack}.ffn.{i}": (f"{stack}.block.{i}.layer.{n}.DenseReluDense.{pre}",
                                 f"{stack}.block.{i}.layer.{n}.DenseReluDense.wo")
            for stack, n in (("encoder", 1), ("decoder", 2)) for i in range(2)}  # fmt: skip


def tower_sites(prefix: str) -> dict:
    return {f"{prefix}ffn.{i}": (f"{prefix.replace('vision.', 'vision_model.')}encoder.layers.{i}.mlp.fc1",
                                 f"{prefix.replace('vision.', 'vision_model.')}encoder.layers.{i}.mlp.fc2")
            for i in range(2)}  # fmt: skip


def dual_sites() -> dict:
    path = "{}_model.encoder.layers.{}.mlp.{}"
    return {f"{tower}.ffn.{i}": (path.format(tower, i, "fc1"), path.format(tower, i, "fc2"))
            for tower in ("text", "vision") for i in range(2)}  # fmt: skip


def whisper_inputs(generator):
    inputs = seq2seq_inputs(generator)
    return dict(input_features=torch.randn(3, 8, 32, generator=generator), labels=inputs["labels"])


def image_text_inputs(generator):
    ids, mask = _padded(3, 7, [7, 4, 6], generator)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 16, 16, generator=generator))


S2S = {"encoder": encoder_rows, "decoder": decoder_rows}
DUAL_SELECT = {"text": text_rows, "vision": all_rows}
VISION = dict(image_size=16, patch_size=4, **SMALL)

# name -> (model factory, sites, inputs, stack -> real rows)
CASES = {
    "mt5": (lambda: tf.MT5ForConditionalGeneration(tf.MT5Config(**T5)), t5_sites("wi_0"), seq2seq_inputs, S2S),
    "umt5": (lambda: tf.UMT5ForConditionalGeneration(tf.UMT5Config(**T5, feed_forward_proj="relu")), t5_sites("wi"),
             seq2seq_inputs, S2S),
    "mbart": (lambda: tf.MBartForConditionalGeneration(tf.MBartConfig(**SEQ2SEQ)), fc_sites("model."), seq2seq_inputs,
              S2S),
    "pegasus": (lambda: tf.PegasusForConditionalGeneration(tf.PegasusConfig(**SEQ2SEQ)), fc_sites("model."),
                seq2seq_inputs, S2S),
    "marian": (lambda: tf.MarianMTModel(tf.MarianConfig(**SEQ2SEQ)), fc_sites("model."), seq2seq_inputs, S2S),
    "whisper": (lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(
                    **SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=32,
                    suppress_tokens=None, begin_suppress_tokens=None)),
                fc_sites("model."), whisper_inputs, {"encoder": all_rows, "decoder": decoder_rows}),
    "clip": (lambda: tf.CLIPModel(tf.CLIPConfig(text_config=dict(vocab_size=V, **SMALL), vision_config=VISION)),
             dual_sites(), image_text_inputs, DUAL_SELECT),
    "siglip": (lambda: tf.SiglipModel(tf.SiglipConfig(text_config=dict(vocab_size=V, **SMALL), vision_config=VISION)),
               dual_sites(), image_text_inputs, DUAL_SELECT),
    "clip_vision_model": (lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION)), tower_sites(""),
                          lambda g: dict(pixel_values=torch.randn(3, 3, 16, 16, generator=g)), {"vision": all_rows}),
    "siglip_vision_model": (lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION)), tower_sites(""),
                            lambda g: dict(pixel_values=torch.randn(3, 3, 16, 16, generator=g)), {"vision": all_rows}),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_table_entry_counts_each_stacks_rows(name):
    make, sites, inputs, select = CASES[name]
    torch.manual_seed(0)
    model = make().eval().double()  # float64 end to end: exact spectra
    assert model.config.model_type == name
    generator = torch.Generator().manual_seed(1)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in inputs(generator).items()}
    capture = StackCapture(model, sites)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        model(**batch)
    capture.remove()
    report = tracker.compute()
    assert [row["site"] for row in report.rows] == list(sites)
    for row in report.rows:
        assert row["tokens"] > 0
        assert_site(row, *capture.rows(row["site"], select[row["stack"]]))
