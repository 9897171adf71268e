"""Layer means are over one family of like FFN sites only, with the family in the key.

A model with one family of dense FFNs logs ``nerve/mean/<metric>``; a model with several (an
encoder-decoder's ``encoder.ffn`` and ``decoder.ffn``, an MLP-Mixer's ``token_mlp`` and ``channel_mlp``)
logs ``nerve/mean/<family>/<metric>`` for each, each the mean of that family's metrics computed here from
an independent float64 capture of each FFN's own pre/post over its real rows; no key mixes the families.
The rebuilt means of run analysis (``with_layer_mean``) and of probe series follow the same scheme.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from reference import activation_metrics
from stack_reference import StackCapture, decoder_rows, encoder_rows

from nerve_hf import FFNTracker
from nerve_hf.analysis.runs import _records_from_log_history, with_layer_mean
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.probe.series import _run_frames


def _family_means(reference: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """family -> metric -> the mean over that family's sites with the metric finite (the reference's)."""
    out: dict[str, dict[str, float]] = {}
    for family in dict.fromkeys(site.rpartition(".")[0] for site in reference):
        members = [values for site, values in reference.items() if site.rpartition(".")[0] == family]
        out[family] = {}
        for metric in METRIC_NAMES:
            kept = [m[metric] for m in members if np.isfinite(m[metric])]
            out[family][metric] = float(np.mean(kept)) if kept else math.nan
    return out


def _assert_family_keys(log: dict, means: dict[str, dict[str, float]], rtol: float) -> None:
    assert len(means) == 2
    assert not [key for key in log if key.startswith("nerve/mean/") and key.count("/") == 2], "a mixed mean"
    for family, metrics in means.items():
        for metric, want in metrics.items():
            assert log[f"nerve/mean/{family}/{metric}"] == pytest.approx(want, rel=rtol, abs=1e-7), (family, metric)
    # the two families really differ: a mean over both would be neither
    families = list(means)
    assert means[families[0]]["pr_pre"] != pytest.approx(means[families[1]]["pr_pre"], rel=1e-3)


def t5_run():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                                   dropout_rate=0.0, decoder_start_token_id=0)  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    sites = {f"{stack}.ffn.{i}": (f"{stack}.block.{i}.layer.{n}.DenseReluDense.wi",
                                  f"{stack}.block.{i}.layer.{n}.DenseReluDense.wo")
             for stack, n in (("encoder", 1), ("decoder", 2)) for i in range(2)}  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1] * 11, [1] * 7 + [0] * 4])  # 18 real encoder rows of 22
    dec_mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])  # 13 real decoder rows of 16
    batch = dict(input_ids=torch.randint(2, 50, (2, 11), generator=gen), attention_mask=mask,
                 decoder_input_ids=torch.randint(2, 50, (2, 8), generator=gen),
                 decoder_attention_mask=dec_mask)  # fmt: skip
    capture = StackCapture(model, sites)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        model(**batch)
    capture.remove()
    report = tracker.compute()
    select = {"encoder": encoder_rows, "decoder": decoder_rows}
    reference = {site: activation_metrics(*capture.rows(site, select[site.split(".")[0]])) for site in sites}
    return report, reference


def test_t5_logs_one_mean_per_stack_each_the_mean_of_its_own_rows():
    report, reference = t5_run()
    assert {row["site"] for row in report.rows} == set(reference)
    means = _family_means(reference)
    _assert_family_keys(report.to_log_dict(), means, rtol=1e-5)
    assert set(report.means()) == {"mean/encoder.ffn", "mean/decoder.ffn"}
    assert report.mean_summary()["mean/decoder.ffn"]["se_post"] == pytest.approx(means["decoder.ffn"]["se_post"])


def test_mlp_mixer_logs_one_mean_per_mlp_family():
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    model = MlpMixer(img_size=20, patch_size=4, embed_dim=24, num_blocks=2, num_classes=3).eval()
    images = torch.randn(6, 3, 20, 20)
    captured = {}
    hooks = []
    for i, block in enumerate(model.blocks):
        for key, mlp in ((f"token_mlp.{i}", block.mlp_tokens), (f"channel_mlp.{i}", block.mlp_channels)):
            hooks.append(mlp.fc1.register_forward_hook(lambda m, a, out, k=key: captured.__setitem__((k, "pre"), out)))
            hooks.append(mlp.fc2.register_forward_pre_hook(lambda m, a, k=key: captured.__setitem__((k, "post"), a[0])))
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    report = tracker.compute()
    reference = {}
    for site in ("token_mlp.0", "token_mlp.1", "channel_mlp.0", "channel_mlp.1"):
        pre, post = (captured[(site, stage)].double() for stage in ("pre", "post"))
        flat = [x.reshape(-1, x.shape[-1]).numpy() for x in (pre, post)]  # token MLP: rows (image, channel)
        reference[site] = activation_metrics(*flat)
    # the channel MLP's pre has rank 24 of 96: its null eigenvalues hold float32 round-off (JS to ~2e-5)
    _assert_family_keys(report.to_log_dict(), _family_means(reference), rtol=1e-4)


def test_single_family_model_keeps_the_plain_mean_key():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).eval()
    with FFNTracker(model, flow=False) as tracker, torch.no_grad():
        model(input_ids=torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0)))
    report = tracker.compute()
    log = report.to_log_dict()
    assert list(report.means()) == ["mean"]
    assert not [key for key in log if key.startswith("nerve/mean/") and key.count("/") > 2]
    for metric in METRIC_NAMES:
        values = [row[metric] for row in report.rows if np.isfinite(row[metric])]
        assert log[f"nerve/mean/{metric}"] == pytest.approx(float(np.mean(values)), rel=1e-12)


def _frame(report, step: int) -> pd.DataFrame:
    return pd.DataFrame([{**row, "step": step, "split": "train"} for row in report.rows])


def test_rebuilt_means_of_runs_and_series_are_per_family_as_logged():
    report, reference = t5_run()
    log = report.to_log_dict()
    frame = with_layer_mean(pd.concat([_frame(report, 1), _frame(report, 2)], ignore_index=True))
    means = frame[frame["layer"] == -1]
    assert sorted(set(means["site"])) == ["mean/decoder.ffn", "mean/encoder.ffn"]
    for row in means.itertuples():
        for metric in METRIC_NAMES:
            want = log[f"nerve/{row.site}/{metric}"]
            assert getattr(row, metric) == pytest.approx(want, rel=1e-12, nan_ok=True), (row.site, metric)
    # log history: the mean keys are never read back as sites
    records = _records_from_log_history([{"step": 1, **log}])
    assert {record["site"] for record in records} == set(reference)
    # probe series: the same layer-mean rows
    series = _frame(report, 5).assign(checkpoint="c")
    metrics, _ = _run_frames(series)
    series_means = metrics[metrics["layer"] == -1].set_index("site")
    assert sorted(series_means.index) == ["mean/decoder.ffn", "mean/encoder.ffn"]
    for site in series_means.index:
        assert series_means.loc[site, "pr_post"] == pytest.approx(log[f"nerve/{site}/pr_post"], rel=1e-12)


def test_position_and_cross_layer_means_are_per_family_too():
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=2,
                                   dropout_rate=0.0, decoder_start_token_id=0)  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(3)
    batch = dict(input_ids=torch.randint(2, 50, (2, 11), generator=gen), attention_mask=torch.ones(2, 11),
                 decoder_input_ids=torch.randint(2, 50, (2, 8), generator=gen))  # fmt: skip
    tracker = FFNTracker(model, flow=False, position_buckets=(0, 4), cross_layer="adjacent")
    with tracker, torch.no_grad():
        model(**batch)
    log = tracker.compute().to_log_dict()
    assert not [key for key in log if key.startswith("nerve/mean/") and key.count("/") == 2]
    for family in ("encoder.ffn", "decoder.ffn"):
        for suffix in ("pr_pre.pos0-4", "pr_post.pos4-inf", "cka_next", "js_pre_next"):
            sites = [log[f"nerve/{family}.{i}/{suffix}"] for i in range(2) if f"nerve/{family}.{i}/{suffix}" in log]
            assert sites, (family, suffix)
            assert log[f"nerve/mean/{family}/{suffix}"] == pytest.approx(float(np.nanmean(sites)), rel=1e-12)
