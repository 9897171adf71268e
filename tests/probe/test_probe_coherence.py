"""`nerve probe --flow --position-buckets ... --cross-layer all`: the new tables and figures, equal to an
FFNTracker run by hand with the same options on the same batches (whose values tests/test_coherence.py
checks against float64 NumPy)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_probe import TEXT, _bpe_tokenizer, assert_png, tracked_report

from nerve_hf.cli import main
from nerve_hf.probe import ProbeConfig
from nerve_hf.report import ROW_KEYS
from nerve_hf.tracking.measurements.cross_layer import CROSS_LAYER_KEYS
from nerve_hf.tracking.measurements.flow import FLOW_KEYS
from nerve_hf.tracking.measurements.positions import POSITION_KEYS

OPTIONS = dict(flow=True, position_buckets=[0, 8, 16], cross_layer="all")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from trainer_helpers import tiny_gpt2

    path = tmp_path_factory.mktemp("gpt2_3")
    tokenizer = _bpe_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer), n_positions=32, n_layer=3, bos_token_id=1, eos_token_id=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def by_hand(model, sequences, batch_size: int, pad_id: int):
    return tracked_report(model, sequences, batch_size, pad_id, **OPTIONS)


def assert_same(got: list[dict], want: list[dict], keys):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for key in keys:
            if isinstance(b[key], float):
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12, nan_ok=True), key
            else:
                assert a[key] == b[key], key


def test_probe_writes_flow_positions_and_cross_layer(gpt2_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text_file = tmp_path / "code.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    args = ["probe", str(gpt2_dir), "--text-file", str(text_file), "--seq-len", "24", "--batch-size", "8"]
    args += ["--flow", "--position-buckets", "0,8,16", "--cross-layer", "all", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert "variance flow" in stdout and "per position bucket" in stdout and "cross-layer coherence" in stdout

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    sequences = [ids[i : i + 24] for i in range(0, len(ids), 24)]
    expected = by_hand(AutoModelForCausalLM.from_pretrained(gpt2_dir), sequences, 8, pad_id=1)

    report = json.loads((out / "report.json").read_text())
    assert_same(report["rows"], expected.rows, ROW_KEYS + FLOW_KEYS)
    assert_same(report["positions"], expected.positions, POSITION_KEYS)
    assert_same(report["cross_layer"], expected.cross_layer, CROSS_LAYER_KEYS)
    assert report["settings"]["position_buckets"] == [0, 8, 16] and report["settings"]["cross_layer"] == "all"
    assert "se_input" in report["mean"]

    csv = pd.read_csv(out / "report.csv")
    assert list(csv.columns) == list(ROW_KEYS) + list(FLOW_KEYS)
    positions = pd.read_csv(out / "positions.csv")
    assert list(positions.columns) == list(POSITION_KEYS) and len(positions) == 3 * 3
    assert positions["tokens"].sum() == 3 * len(ids)  # the buckets partition every layer's tokens
    cross = pd.read_csv(out / "cross_layer.csv")
    assert list(cross.columns) == list(CROSS_LAYER_KEYS) and len(cross) == 3  # all pairs of 3 layers
    matrix = pd.read_csv(out / "cka_matrix.csv", index_col="layer")
    assert matrix.shape == (3, 3) and np.allclose(np.diag(matrix.to_numpy()), 1.0)
    assert matrix.loc[0, "2"] == pytest.approx(expected.cross_layer[1]["cka"], rel=1e-12)
    buckets = np.load(out / "position_eigenvalues.npz")
    assert len(buckets.files) == 2 * len(expected.positions)  # pre and post of every site and bucket
    for (site, bucket), spectra in expected.position_eigenvalues.items():
        for stage, want in zip(("pre", "post"), spectra):
            assert np.allclose(buckets[f"{site}/pos/{bucket}/{stage}"], want.numpy(), rtol=1e-9, atol=1e-12)
    flow = np.load(out / "flow_eigenvalues.npz")
    assert flow["ffn.2/input"].shape == flow["ffn.2/output"].shape == (24,)
    for name in ("flow.png", "positions.png", "cross_layer.png", "metrics_per_layer.png"):
        assert_png(out / name)


def test_probe_options_are_checked():
    with pytest.raises(ValueError, match="position-buckets"):
        ProbeConfig(model="m", position_buckets=[4, 2])
    with pytest.raises(ValueError, match="cross-layer"):
        ProbeConfig(model="m", cross_layer="every")
    config = ProbeConfig(model="m", flow=False)  # flow is on by default (MeasurementOptions)
    assert (config.flow, config.position_buckets, config.cross_layer) == (False, None, None)


def test_two_site_families_get_one_matrix_each(tmp_path):
    """An MLP-Mixer has token and channel MLPs: one CKA matrix per family, heatmaps one row per family."""
    from timm.models.mlp_mixer import MlpMixer

    from nerve_hf.probe import ProbeResult, probe_model, write_probe

    torch.manual_seed(0)
    model = MlpMixer(img_size=20, patch_size=4, embed_dim=24, num_blocks=3, num_classes=3).eval()
    report = probe_model(model, [torch.randn(6, 3, 20, 20)], **OPTIONS)
    assert {(r["site_a"].split(".")[0], r["site_b"].split(".")[0]) for r in report.cross_layer} == {
        ("token_mlp", "token_mlp"),
        ("channel_mlp", "channel_mlp"),
    }
    written = {path.name for path in write_probe(ProbeResult(report=report, model={"name": "mixer"}), tmp_path)}
    assert {"cka_matrix_token_mlp.csv", "cka_matrix_channel_mlp.csv", "cross_layer.png", "flow.png"} <= written
    matrix = pd.read_csv(tmp_path / "cka_matrix_channel_mlp.csv", index_col="layer")
    assert matrix.shape == (3, 3)
    assert_png(tmp_path / "cross_layer.png")
