"""Packed and padding-free batches (no attention_mask): real tokens and in-sequence positions.

The rule of :class:`~nerve_hf.tracking.packed.PackedRows` is checked on the real output of the two
padding-free collators (transformers ``DataCollatorWithFlattening``, TRL
``DataCollatorForLanguageModeling(padding_free=True)``) against the truth known from the examples'
lengths; FFNTracker on such batches is checked against a float64 capture of the FFN's own modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from reference import activation_metrics
from torch import nn

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.stats.covariance import CovarianceAccumulator
from nerve_hf.tracking.packed import PackedRows
from nerve_hf.tracking.tracker import FFNTracker

VOCAB, PAD = 53, 0
LENGTHS = (31, 1, 17, 24, 40)  # one single-token sequence inside the batch; 113 real tokens in all


def examples(lengths=LENGTHS, end_with_pad=True, seed=0) -> list[list[int]]:
    """Token lists of ``lengths``; with ``end_with_pad`` each ends with the pad token, as when the pad
    token is also the eos that TRL appends (its default when a tokenizer has no pad token)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(PAD + 1, VOCAB, (n,), generator=gen).tolist()
        if end_with_pad and n > 1:
            ids[-1] = PAD
        out.append(ids)
    return out


def truth(lengths=LENGTHS, total=None, start=0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real [1, total] bool, positions [1, sum(lengths)])`` known from the examples themselves."""
    n = sum(lengths)
    total = n if total is None else total
    real = torch.zeros(1, total, dtype=torch.bool)
    real[0, :n] = True
    positions = torch.cat([torch.arange(k) + start for k in lengths])[None]
    return real, positions


def trl_batch(pad_to_multiple_of=None, end_with_pad=True, lengths=LENGTHS) -> dict:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(
        pad_token_id=PAD, padding_free=True, pad_to_multiple_of=pad_to_multiple_of
    )
    return collator([{"input_ids": ids} for ids in examples(lengths, end_with_pad)])


def _root(pad_token_id=PAD) -> nn.Module:
    """A stand-in model: a config with a pad token and a forward taking input_ids and position_ids."""

    class Root(nn.Module):
        config = transformers.PretrainedConfig(pad_token_id=pad_token_id)

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
            return input_ids

    return Root()


# ----------------------------------------------------------------------------- 1. the rule, on real collator output
@pytest.mark.parametrize("multiple", [None, 8, 64, 128])
@pytest.mark.parametrize("end_with_pad", [True, False])
def test_trl_padding_free_collator_padding_and_positions_are_exact(multiple, end_with_pad):
    batch = trl_batch(multiple, end_with_pad)
    total = batch["input_ids"].shape[1]
    assert "attention_mask" not in batch and total >= sum(LENGTHS)
    if multiple is not None:
        assert total % multiple == 0
    want_real, want_positions = truth(total=total)
    rows = PackedRows(_root())
    for call in (batch, {k: v for k, v in batch.items() if k != "position_ids"}):  # position_ids, cu_seq_lens_q
        real, positions = rows.read((), call)
        assert torch.equal(real, want_real)
        assert torch.equal(positions[real][None], want_positions)
    # positional input_ids and position_ids (forward(input_ids, attention_mask, position_ids))
    real, positions = rows.read((batch["input_ids"], None, batch["position_ids"]), {})
    assert torch.equal(real, want_real) and torch.equal(positions[real][None], want_positions)


@pytest.mark.parametrize("start", [0, 2])
@pytest.mark.parametrize("flash_kwargs", [False, True])
def test_transformers_flattening_collator_has_no_padding(start, flash_kwargs):
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, position_ids_start=start)
    batch = collator([{"input_ids": ids} for ids in examples()])
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(LENGTHS))
    want_real, want_positions = truth(start=start)
    real, positions = PackedRows(_root()).read((), batch)
    assert torch.equal(real, want_real) and torch.equal(positions, want_positions)
    if flash_kwargs:  # the flash-attention offsets alone give in-sequence indices (from 0)
        call = {k: v for k, v in batch.items() if k != "position_ids"}
        real, positions = PackedRows(_root()).read((), call)
        assert torch.equal(real, want_real) and torch.equal(positions, want_positions - start)


def test_without_a_pad_token_or_packing_inputs_nothing_is_dropped():
    batch = trl_batch(64)
    real, _ = PackedRows(_root(pad_token_id=None)).read((), batch)
    assert bool(real.all())  # no pad token known: the rule cannot see padding
    assert PackedRows(_root()).read((), {"input_ids": batch["input_ids"]}) is None


# ----------------------------------------------------------------------------- 2. FFNTracker against a float64 capture
HIDDEN, FFN = 24, 37


def tiny_llama(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=PAD,
    )
    return transformers.LlamaForCausalLM(config).eval()


def capture(model, inputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, float64 (pre, post) rows [B*T, FFN] of one forward: gate_proj's output and down_proj's
    input, read by hooks of this test's own."""
    got, hooks = {}, []
    for layer, block in enumerate(model.model.layers):
        mlp = block.mlp
        hooks.append(mlp.gate_proj.register_forward_hook(lambda m, a, out, k=layer: got.__setitem__((k, 0), out)))
        hooks.append(mlp.down_proj.register_forward_pre_hook(lambda m, a, k=layer: got.__setitem__((k, 1), a[0])))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [tuple(got[(k, s)].double().reshape(-1, FFN) for s in (0, 1)) for k in range(len(model.model.layers))]


def assert_report_matches(report, captured, keep: torch.Tensor, rel=1e-5):
    assert [row["site"] for row in report.rows] == ["ffn.0", "ffn.1"]
    for row, (pre, post) in zip(report.rows, captured):
        assert row["tokens"] == int(keep.sum())
        expected = activation_metrics(pre[keep].numpy(), post[keep].numpy())
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(expected[name], rel=rel, abs=1e-7), (row["site"], name)


def run(model, inputs, **options):
    tracker = FFNTracker(model, flow=False, **options)
    with tracker, torch.no_grad():
        model(**inputs)
    return tracker.compute()


@pytest.fixture(scope="module")
def packed():
    """TRL's padding-free batch padded to a multiple of 64 ([1, 128], 15 pads), a tiny LLaMA and its
    float64 capture."""
    batch = trl_batch(64)
    inputs = {k: batch[k] for k in ("input_ids", "position_ids")}
    model = tiny_llama()
    return model, inputs, capture(model, inputs)


def test_padding_free_batch_counts_only_real_tokens(packed):
    model, inputs, captured = packed
    assert inputs["input_ids"].shape == (1, 128)
    keep, _ = truth(total=128)
    report = run(model, inputs)
    assert_report_matches(report, captured, keep[0])
    all_rows = activation_metrics(captured[0][0].numpy(), captured[0][1].numpy())
    assert not math.isclose(report.rows[0]["pr_pre"], all_rows["pr_pre"], rel_tol=1e-3)  # the pads matter


def test_padding_free_batch_on_the_device_path(packed, monkeypatch):
    """Where the host may not read device tensors, the same rows come as a keep mask."""
    monkeypatch.setattr(CovarianceAccumulator, "HOST_SYNC_DEVICE_TYPES", ())
    model, inputs, captured = packed
    assert_report_matches(run(model, inputs), captured, truth(total=128)[0][0])


def test_padding_free_position_buckets_use_positions_in_each_sequence(packed):
    model, inputs, captured = packed
    edges = [0, 8, 20]
    report = run(model, inputs, position_buckets=edges)
    keep, positions = truth(total=128)
    positions = positions[0].numpy()  # [113]: the real tokens' positions in their own sequences
    assert [(r["site"], r["bucket"]) for r in report.positions] == [
        (site, bucket) for site in ("ffn.0", "ffn.1") for bucket in ("0-8", "8-20", "20-inf")
    ]
    for row in report.positions:
        pre, post = captured[int(row["site"][-1])]
        end = row["position_end"] if row["position_end"] is not None else math.inf
        chosen = (positions >= row["position_start"]) & (positions < end)
        assert row["tokens"] == int(chosen.sum())
        expected = activation_metrics(pre[keep[0]].numpy()[chosen], post[keep[0]].numpy()[chosen])
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (row["bucket"], name)
    assert [r["tokens"] for r in report.positions[:3]] == [8 * 4 + 1, 12 * 3 + 9, 11 + 4 + 20]  # by hand


def test_an_attention_mask_still_decides_when_given(packed):
    model, inputs, captured = packed
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, 100:] = 0
    report = run(model, {**inputs, "attention_mask": mask})
    assert_report_matches(report, captured, mask[0].bool())
