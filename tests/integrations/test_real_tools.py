"""Token truth in real training tools: TRL's SFTTrainer (plain, packing, padding-free with and without
``pad_to_multiple_of``, completion-only and assistant-only loss), PEFT LoRA (and after
``merge_and_unload``), ``torch.compile`` and bf16.

Each run trains one optimizer step of a tiny model built from its config, with a tokenizer trained
here, under ``NerveCallback(every_n_steps=1)``. Its JSONL records are compared with a float64 capture
of the same forward by this file's own hooks: pre = the output of the FFN's gate/up module (a LoRA
layer's output when PEFT wraps it), post = the input of its down module, over the real tokens only,
which are known independently: the pad token never occurs in the data, so they are the non-pad ones.
"""

from __future__ import annotations

import math

import peft
import pytest
import torch
import transformers
import trl
from datasets import Dataset
from reference import activation_metrics

from nerve_hf import FFNTracker, NerveCallback
from nerve_hf.data import train_bpe_tokenizer
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sinks.records import read_records

EOS, PAD = 0, 1  # the tokenizer's special tokens, in train_bpe_tokenizer's order
TEXTS = [f"def f{i}(x, y):\n    return x * {i} + y - {i * i}\n" * (1 + i % 4) for i in range(24)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|endoftext|>"
    "{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300)
    assert (tok.eos_token_id, tok.pad_token_id) == (EOS, PAD)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def llama(vocab: int, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=24,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=6,
        vocab_size=vocab,
        max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(config)


def gpt2(vocab: int, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=24, n_inner=37, n_layer=2, n_head=3, vocab_size=vocab, n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(config)


def ffn_modules(model) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """(module whose output is pre, module whose input is post) of each layer, found by this test."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "transformer"):  # GPT-2
        return [(block.mlp.c_fc, block.mlp.c_proj) for block in base.transformer.h]
    return [(layer.mlp.gate_proj, layer.mlp.down_proj) for layer in base.model.layers]


class Capture:
    """float64 pre/post rows of every forward (not the recomputes of gradient checkpointing, which
    SFTConfig turns on by default), and the top-level call's inputs, by hooks of its own."""

    def __init__(self, model):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.calls, self.rows, self.dtypes, self.hooks = [], {}, set(), []
        self.hooks.append(base.register_forward_pre_hook(self._call, with_kwargs=True))
        for layer, (up, down) in enumerate(ffn_modules(model)):
            self.hooks.append(up.register_forward_hook(torch.compiler.disable(self._pre(layer))))
            self.hooks.append(down.register_forward_pre_hook(torch.compiler.disable(self._post(layer))))

    @torch.compiler.disable
    def _call(self, module, args, kwargs):
        self.calls.append({k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})

    def _keep(self, layer, stage, x):
        if torch._C._current_graph_task_id() != -1:  # TRL checkpoints activations: a backward recompute
            return
        self.dtypes.add(x.dtype)
        self.rows.setdefault((layer, stage), []).append(x.detach().double().reshape(-1, x.shape[-1]))

    def _pre(self, layer):
        return lambda module, args, out: self._keep(layer, "pre", out)

    def _post(self, layer):
        return lambda module, args: self._keep(layer, "post", args[0])

    def remove(self):
        for hook in self.hooks:
            hook.remove()

    def real(self) -> torch.Tensor:
        """[N] bool over the rows of all captured forwards: the non-pad tokens."""
        return torch.cat([call["input_ids"].reshape(-1) != PAD for call in self.calls])

    def metrics(self, layer: int) -> dict:
        keep = self.real()
        pre, post = (torch.cat(self.rows[(layer, stage)])[keep].numpy() for stage in ("pre", "post"))
        return activation_metrics(pre, post)


def sft(tmp_path, tokenizer, dataset, model, peft_config=None, **options):
    """One optimizer step of SFTTrainer under NerveCallback(every_n_steps=1): (step-1 records, capture,
    trainer). float32 unless ``bf16=True`` is passed (SFTConfig's own default is bf16 autocast)."""
    options.setdefault("bf16", False)
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **options,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[NerveCallback(every_n_steps=1)],
    )
    capture = Capture(trainer.model)
    try:
        trainer.train()
    finally:
        capture.remove()
    records = [r for r in read_records(tmp_path / "nerve_metrics.jsonl") if r["split"] == "train"]
    assert [(r["step"], r["site"]) for r in records] == [(1, "ffn.0"), (1, "ffn.1")]
    return records, capture, trainer


def assert_records_match(records, capture, rel=1e-4, abs=1e-6):
    real = int(capture.real().sum())
    assert 0 < real
    for layer, record in enumerate(records):
        assert record["tokens"] == real, record["site"]
        expected = capture.metrics(layer)
        for name in METRIC_NAMES:
            assert record[name] == pytest.approx(expected[name], rel=rel, abs=abs), (record["site"], name)


def text_data(n=12) -> Dataset:
    return Dataset.from_dict({"text": TEXTS[:n]})


# ----------------------------------------------------------------------------- TRL SFTTrainer
def test_sft_plain_padded_batch(tmp_path, tokenizer):
    records, capture, _ = sft(tmp_path, tokenizer, text_data(), gpt2(len(tokenizer)))
    (call,) = capture.calls
    assert "attention_mask" in call and int((call["input_ids"] == PAD).sum()) > 0  # a right-padded batch
    assert_records_match(records, capture)


def test_sft_packing(tmp_path, tokenizer):
    records, capture, _ = sft(tmp_path, tokenizer, text_data(), llama(len(tokenizer)), packing=True, max_length=96)
    (call,) = capture.calls
    assert "attention_mask" not in call and "position_ids" in call  # bfd packing is padding-free
    assert int((call["position_ids"] == 0).sum()) > call["input_ids"].shape[0]  # several sequences per row
    assert_records_match(records, capture)


@pytest.mark.parametrize("multiple", [None, 64])
def test_sft_padding_free(tmp_path, tokenizer, multiple):
    records, capture, _ = sft(
        tmp_path,
        tokenizer,
        text_data(),
        llama(len(tokenizer)),
        padding_free=True,
        pad_to_multiple_of=multiple,
        max_length=None,  # padding-free without packing does not truncate
    )
    (call,) = capture.calls
    assert "attention_mask" not in call and call["input_ids"].shape[0] == 1
    pads = int((call["input_ids"] == PAD).sum())
    assert (pads > 0) == (multiple is not None) and call["input_ids"].shape[1] % (multiple or 1) == 0
    assert_records_match(records, capture)


def test_sft_completion_only_loss_counts_prompt_and_completion(tmp_path, tokenizer):
    data = Dataset.from_dict({"prompt": [t[:30] for t in TEXTS[:12]], "completion": [t[30:] for t in TEXTS[:12]]})
    records, capture, _ = sft(tmp_path, tokenizer, data, llama(len(tokenizer)), completion_only_loss=True)
    (call,) = capture.calls
    real = call["input_ids"] != PAD
    assert bool(((call["labels"] == -100) & real).any())  # prompt tokens carry no loss, and are still counted
    assert_records_match(records, capture)


def test_sft_assistant_only_loss(tmp_path, tokenizer):
    messages = [[{"role": "user", "content": t[:25]}, {"role": "assistant", "content": t[25:60]}] for t in TEXTS[:12]]
    records, capture, _ = sft(
        tmp_path, tokenizer, Dataset.from_dict({"messages": messages}), llama(len(tokenizer)), assistant_only_loss=True
    )
    (call,) = capture.calls
    real = call["input_ids"] != PAD
    assert bool(((call["labels"] == -100) & real).any())  # user turns carry no loss, and are still counted
    assert_records_match(records, capture)


# ----------------------------------------------------------------------------- PEFT LoRA
def lora_config():
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False,  # a non-zero delta from the start
        task_type="CAUSAL_LM",
    )


def test_peft_lora_on_the_ffn_and_after_merge_and_unload(tmp_path, tokenizer):
    records, capture, trainer = sft(tmp_path, tokenizer, text_data(), llama(len(tokenizer)), peft_config=lora_config())
    lora = trainer.model
    assert isinstance(lora, peft.PeftModel)
    assert capture.dtypes == {torch.float32}
    assert_records_match(records, capture)
    # the LoRA delta is in pre: the base layer alone gives other metrics
    (call,) = capture.calls
    inputs = {k: call[k] for k in ("input_ids", "attention_mask")}
    base_out = []
    gate = ffn_modules(lora)[0][0]
    hook = gate.base_layer.register_forward_hook(lambda m, a, out: base_out.append(out.detach().double()))
    with torch.no_grad():
        lora.eval()
        lora(**inputs)
    hook.remove()
    keep = inputs["input_ids"].reshape(-1) != PAD
    base_pre = base_out[0].reshape(-1, 37)[keep].numpy()
    base_pr = activation_metrics(base_pre, base_pre)["pr_pre"]
    tracked = FFNTracker(lora, flow=False)
    with tracked, torch.no_grad():
        lora(**inputs)
    report = tracked.compute()
    assert not math.isclose(report.rows[0]["pr_pre"], base_pr, rel_tol=1e-3)

    merged = lora.merge_and_unload()
    assert not any("lora" in name for name, _ in merged.named_modules())
    after = Capture(merged)
    tracker = FFNTracker(merged, flow=False)
    with tracker, torch.no_grad():
        merged(**inputs)
    after.remove()
    merged_report = tracker.compute()
    for layer, row in enumerate(merged_report.rows):
        assert row["tokens"] == int(keep.sum())
        expected = after.metrics(layer)
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), (row["site"], name)
            # merging changes no value: the LoRA model's rows equal the merged model's
            assert row[name] == pytest.approx(report.rows[layer][name], rel=1e-4, abs=1e-6), (row["site"], name)


# ----------------------------------------------------------------------------- torch.compile and bf16
def test_torch_compile_padding_free(tmp_path, tokenizer):
    torch._dynamo.reset()
    try:
        records, capture, _ = sft(
            tmp_path,
            tokenizer,
            text_data(),
            llama(len(tokenizer)),
            padding_free=True,
            pad_to_multiple_of=64,
            max_length=None,
            torch_compile=True,
            torch_compile_backend="eager",
        )
    finally:
        torch._dynamo.reset()
    assert int((capture.calls[0]["input_ids"] == PAD).sum()) > 0
    assert_records_match(records, capture)


def test_bf16_autocast_padding_free(tmp_path, tokenizer):
    """SFTConfig's default precision: bf16 autocast over float32 weights, so the FFN's activations are bf16."""
    records, capture, _ = sft(
        tmp_path,
        tokenizer,
        text_data(),
        llama(len(tokenizer)),
        bf16=True,
        padding_free=True,
        pad_to_multiple_of=64,
        max_length=None,
    )
    assert capture.dtypes == {torch.bfloat16} and int((capture.calls[0]["input_ids"] == PAD).sum()) > 0
    # the same bf16 values, in float64: the tracker centres bf16 rows per batch, hence a looser tolerance
    assert_records_match(records, capture, rel=2e-2, abs=1e-4)
