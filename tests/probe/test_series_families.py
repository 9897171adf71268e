"""`nerve probe` over a checkpoint series prints the layer mean of every family of sites per checkpoint:
a Qwen2-MoE with a dense block (``mlp_only_layers``), a shared expert and routed experts has three, none
averaged with another. The printed values are the means of the series' own per-site rows (series.csv,
whose rows tests/probe/test_series.py checks against single probes), by kind, recomputed here."""

from __future__ import annotations

import pandas as pd
import torch
from test_probe import TEXT, _bpe_tokenizer

from nerve_hf.cli import main
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.probe.tables import format_value


def _save_qwen2_moe(path, seed: int) -> None:
    import transformers as tf

    tokenizer = _bpe_tokenizer()
    config = tf.Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2, num_attention_heads=2,
        num_key_value_heads=2, num_hidden_layers=2, mlp_only_layers=[0], bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = tf.Qwen2MoeForCausalLM(config)
    with torch.no_grad():  # distinct experts (fused expert weights start from the same init)
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.normal_(0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_series_prints_every_familys_mean(tmp_path, capsys):
    run = tmp_path / "run"
    for step in (1, 2):
        _save_qwen2_moe(run / f"checkpoint-{step}", seed=step)
    text_file = tmp_path / "code.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    args = ["probe", str(run), "--text-file", str(text_file), "--seq-len", "24", "--batch-size", "8", "--no-flow"]
    assert main([*args, "--no-plots", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(printed) if line.startswith("layer means per checkpoint"))
    header, table = printed[start + 1].split(), [line.split() for line in printed[start + 3 : start + 9]]
    assert header == ["checkpoint", "step", "mean", *METRIC_NAMES]
    sites = pd.read_csv(out / "series.csv")
    sites = sites[~sites["site"].str.startswith("mean")]
    expected = []
    for step in (1, 2):
        at = sites[sites["step"] == step]
        for kind, name in (("dense", "mean"), ("shared_expert", "mean/shared_expert"), ("expert", "mean/expert")):
            rows = at[at["kind"] == kind]
            assert len(rows) == {"dense": 1, "shared_expert": 1, "expert": 4}[kind]
            means = [format_value(float(rows[metric].mean())) for metric in METRIC_NAMES]
            expected.append([f"checkpoint-{step}", str(step), name, *means])
    assert table == expected
