"""`nerve probe` on a saved tiny Mixtral: a row per routed expert and the routing statistics in report.json and
the CSVs, each expert's spectra in eigenvalues.npz, all equal to an FFNTracker run by hand on the same batches
(whose per-expert values tests/tracking/test_experts.py checks against a float64 recompute)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_probe import TEXT, _bpe_tokenizer, assert_png, tracked_report

from nerve_hf.cli import main
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.tracking.measurements.experts import ROUTING_KEYS


def _save_mixtral(path, seed: int = 0):
    import transformers as tf

    tokenizer = _bpe_tokenizer()
    config = tf.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = tf.MixtralForCausalLM(config)
    with torch.no_grad():  # make every expert distinct (fused expert weights start from the same init)
        for name, param in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                param.normal_(0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return _save_mixtral(tmp_path_factory.mktemp("mixtral"))


def _probe(mixtral_dir, tmp_path, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    text_file = tmp_path / "code.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    args = ["probe", str(mixtral_dir), "--text-file", str(text_file), "--seq-len", "24", "--batch-size", "8"]
    assert main([*args, "--no-flow", "--out", str(out), "--no-progress", *extra]) == 0
    return out


def _by_hand(mixtral_dir, **options):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mixtral_dir)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    sequences = [ids[i : i + 24] for i in range(0, len(ids), 24)]
    model = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    return tracked_report(model, sequences, 8, pad_id=1, flow=False, **options), len(ids)


def test_probe_writes_every_expert_and_the_routing(mixtral_dir, tmp_path):
    out = _probe(mixtral_dir, tmp_path)
    want, n_tokens = _by_hand(mixtral_dir)
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert [(r["layer"], r["expert"], r["kind"]) for r in rows] == [(n, e, "expert") for n in (0, 1) for e in range(4)]
    for got, row in zip(rows, want.rows):
        assert got["site"] == row["site"] and got["tokens"] == row["tokens"]
        for metric in METRIC_NAMES:
            assert got[metric] == pytest.approx(row[metric], rel=1e-9, nan_ok=True), (row["site"], metric)
    for layer in (0, 1):  # real tokens x top-2, each (token, expert) pair once
        assert sum(r["tokens"] for r in rows if r["layer"] == layer) == 2 * n_tokens
    assert [r["assignments_per_expert"] for r in report["routing"]] == [
        r["assignments_per_expert"] for r in want.routing
    ]
    assert report["routing"][0]["tokens"] == n_tokens
    assert report["routing"][1]["load_cv"] == pytest.approx(want.routing[1]["load_cv"], rel=1e-12)

    csv = pd.read_csv(out / "report.csv")
    assert list(csv["expert"]) == [e for _ in (0, 1) for e in range(4)] and set(csv["kind"]) == {"expert"}
    routing = pd.read_csv(out / "routing.csv")
    assert list(routing.columns) == [*ROUTING_KEYS, "assignments_per_expert"] and len(routing) == 2
    assert list(routing["assignments"]) == [2 * n_tokens] * 2
    spectra = np.load(out / "eigenvalues.npz")
    for site, (pre, post) in want.eigenvalues.items():
        assert np.allclose(spectra[f"{site}/pre"], pre.numpy(), rtol=1e-9, atol=1e-12)
        assert np.allclose(spectra[f"{site}/post"], post.numpy(), rtol=1e-9, atol=1e-12)
    assert "experts[3].1/post" in spectra.files
    for name in ("metrics_per_layer.png", "experts.png"):
        assert_png(out / name)


def test_probe_expert_subset_and_refusals(mixtral_dir, tmp_path, capsys):
    out = _probe(mixtral_dir, tmp_path, "--experts", "3,1")
    report = json.loads((out / "report.json").read_text())
    assert [(r["layer"], r["expert"]) for r in report["rows"]] == [(0, 1), (0, 3), (1, 1), (1, 3)]
    assert report["settings"]["experts"] == [1, 3]
    assert len(report["routing"][0]["assignments_per_expert"]) == 4  # the routing still covers every expert
    want, _ = _by_hand(mixtral_dir, experts=[1, 3])
    assert [r["pr_post"] for r in report["rows"]] == pytest.approx([r["pr_post"] for r in want.rows], rel=1e-9)
    capsys.readouterr()
    assert main(["probe", str(mixtral_dir), "--experts", "7", "--no-progress", "--out", str(tmp_path / "x")]) != 0
    assert "has 4 experts" in capsys.readouterr().err
    assert main(["probe", str(mixtral_dir), "--experts", "1", "--experts-per-step", "2"]) != 0
    assert "not both" in capsys.readouterr().err


def test_checkpoint_series_of_a_moe_keeps_expert_rows_and_routing(mixtral_dir, tmp_path):
    run = tmp_path / "run"
    for step, seed in ((1, 0), (2, 5)):
        _save_mixtral(run / f"checkpoint-{step}", seed)
    out = _probe(run, tmp_path)
    frame = pd.read_csv(out / "series.csv")
    assert list(frame["expert"]) == [e for _ in (1, 2) for _ in (0, 1) for e in range(4)]
    content = json.loads((out / "series.json").read_text())
    for entry, seed in zip(content["checkpoints"], (0, 5)):
        single = _probe(_save_mixtral(tmp_path / f"single{seed}", seed), tmp_path / f"p{seed}")
        want = json.loads((single / "report.json").read_text())
        assert entry["routing"] == want["routing"]
        for got, row in zip(entry["rows"], want["rows"]):
            assert (got["site"], got["expert"], got["tokens"]) == (row["site"], row["expert"], row["tokens"])
            assert got["pr_post"] == pytest.approx(row["pr_post"], rel=1e-9, nan_ok=True)
    for name in ("series_trajectories.png", "series_heatmaps.png", "series_experts.png"):
        assert_png(out / name)
