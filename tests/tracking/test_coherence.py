"""Flow (input -> pre -> post -> output), position buckets and cross-layer coherence of FFNTracker, each
against an independent float64 NumPy/SciPy computation on tiny models with odd sizes.

The references capture only each FFN's *input* with their own hook, recompute pre, post and output by
hand from the module weights in float64, and compute covariances, metrics and CKA with NumPy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from distributed_helpers import torchrun
from reference import activation_metrics, spectrum_reference, two_pass
from scipy.spatial.distance import jensenshannon
from test_tracker import FAMILIES, FFN, HIDDEN, LENGTHS, _conv1d, _lin, batch, build, captured_inputs, run_tracker
from trainer_helpers import tiny_gpt2

from nerve_hf.analysis.layers import layer_matrix
from nerve_hf.metrics import padded_js
from nerve_hf.report import METRIC_NAMES, ROW_KEYS
from nerve_hf.stats.cross_covariance import CrossCovarianceAccumulator, linear_cka
from nerve_hf.tracking.budget import MemoryBudgetError
from nerve_hf.tracking.measurements.flow import FLOW_KEYS
from nerve_hf.tracking.measurements.positions import POSITION_KEYS, bucket_labels
from nerve_hf.tracking.tracker import FFNTracker

# family -> (FFN module of a block, its output from the block's FFN module and post), by hand in float64
OUTPUTS = {
    "gpt2": (lambda block: block.mlp, lambda mlp, post: _conv1d(mlp.c_proj, post)),
    "llama": (lambda block: block.mlp, lambda mlp, post: _lin(mlp.down_proj, post)),
    "phi3": (lambda block: block.mlp, lambda mlp, post: _lin(mlp.down_proj, post)),
    "opt": (lambda block: block, lambda layer, post: _lin(layer.fc2, post)),  # rows arrive flat [B*T, d]
}


def capture_stages(model, family: str, inputs) -> dict[str, dict[str, np.ndarray]]:
    """site -> {input, pre, post, output} float64 rows of the real tokens, and the tokens' positions."""
    _, _, blocks, _, pre_post = FAMILIES[family]
    ffn_of, output_of = OUTPUTS.get(family, (None, None))
    targets = [block.fc1 if family == "opt" else ffn_of(block) for block in blocks(model)]
    captured = captured_inputs(model, targets, inputs)
    mask = inputs["attention_mask"]
    keep = mask.reshape(-1).bool()
    positions = (mask.cumsum(-1) - 1).reshape(-1)[keep].numpy()
    stages = {}
    for layer, block in enumerate(blocks(model)):
        mlp = ffn_of(block)
        x = captured[layer].reshape(-1, captured[layer].shape[-1])[keep]  # [N, d]
        with torch.no_grad():
            pre, post = pre_post(mlp, x)
            output = output_of(mlp, post)
        stages[f"ffn.{layer}"] = {
            "input": x.numpy(),
            "pre": pre.numpy(),
            "post": post.numpy(),
            "output": output.numpy(),
            "positions": positions,
        }
    return stages


def spectrum(rows: np.ndarray) -> dict:
    return spectrum_reference(np.linalg.eigvalsh(two_pass(rows)))


def padded_js_reference(p: np.ndarray, q: np.ndarray) -> float:
    """JS of two normalised spectra, the shorter zero-padded (SciPy; squared distance = divergence)."""
    n = max(len(p), len(q))
    return float(jensenshannon(np.pad(p, (0, n - len(p))), np.pad(q, (0, n - len(q)))) ** 2)


def cka_reference(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    return float(np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


# ----------------------------------------------------------------------------- 1. flow
@pytest.mark.parametrize("family", sorted(OUTPUTS))
def test_flow_stages_match_float64_reference(family):
    model = build(family)
    inputs = batch(side="right")
    stages = capture_stages(model, family, inputs)
    report = run_tracker(model, inputs, flow=True)
    assert list(report.flow_eigenvalues) == list(stages)
    for row in report.rows:
        ref = stages[row["site"]]
        assert list(row) == list(ROW_KEYS) + list(FLOW_KEYS)
        assert row["dim_input"] == HIDDEN and row["tokens"] == sum(LENGTHS)
        expected = activation_metrics(ref["pre"], ref["post"])  # the paper's seven metrics are unchanged
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(expected[name], rel=1e-5, abs=1e-7), (row["site"], name)
        spectra = {stage: spectrum(ref[stage]) for stage in ("input", "pre", "post", "output")}
        for stage in ("input", "output"):
            for metric in ("se", "pr", "eee"):
                got, want = row[f"{metric}_{stage}"], spectra[stage][metric]
                assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (row["site"], metric, stage)
        assert row["js_input_pre"] == pytest.approx(
            padded_js_reference(spectra["input"]["p"], spectra["pre"]["p"]), rel=1e-4, abs=1e-8
        )
        assert row["js_post_output"] == pytest.approx(
            padded_js_reference(spectra["post"]["p"], spectra["output"]["p"]), rel=1e-4, abs=1e-8
        )
        eig_input, eig_output = report.flow_eigenvalues[row["site"]]
        assert eig_input.shape == eig_output.shape == (HIDDEN,) and eig_input.dtype == torch.float64


def unpadded(padded: dict) -> list[dict]:
    """Each sequence of a padded batch alone, without its pads."""
    singles = []
    for i in range(len(padded["input_ids"])):
        keep = padded["attention_mask"][i].bool()
        singles.append({key: value[i][keep][None] for key, value in padded.items()})
    return singles


def test_flow_excludes_padding_like_pre_and_post():
    """Left padding with position ids: the same input/output spectra as the sequences one by one."""
    model = build("gpt2")
    padded = batch(side="left")
    report_padded = run_tracker(model, padded, flow=True)
    report_single = run_tracker(model, *unpadded(padded), flow=True)
    for a, b in zip(report_padded.rows, report_single.rows):
        for name in FLOW_KEYS:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-7), name


def test_flow_off_rows_are_unchanged_and_pr_mode_has_no_spectra():
    model = build("gpt2")
    inputs = batch()
    plain = run_tracker(model, inputs)
    assert all(list(row) == list(ROW_KEYS) for row in plain.rows)
    assert plain.positions == [] and plain.cross_layer == [] and plain.flow_eigenvalues == {}
    assert "nerve/mean/se_input" not in plain.to_log_dict()
    tracker = FFNTracker(model, flow=True)
    with tracker, torch.no_grad():
        model(**inputs)
    pr_only = tracker.compute(metrics="pr")
    stages = capture_stages(model, "gpt2", inputs)
    for row in pr_only.rows:
        assert row["pr_input"] == pytest.approx(spectrum(stages[row["site"]]["input"])["pr"], rel=1e-6)
        assert math.isnan(row["se_input"]) and math.isnan(row["js_input_pre"])
    assert pr_only.flow_eigenvalues == {}


def test_padded_js_definition():
    assert padded_js(torch.tensor([3.0, 1.0]), torch.tensor([6.0, 2.0, 0.0, 0.0])) == pytest.approx(0.0, abs=1e-15)
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.9, 0.1])
    assert padded_js(torch.tensor(p), torch.tensor(q)) == pytest.approx(padded_js_reference(p, q), rel=1e-12)
    assert math.isnan(padded_js(None, torch.ones(2))) and math.isnan(padded_js(torch.zeros(2), torch.ones(2)))


# ----------------------------------------------------------------------------- 2. position buckets
EDGES = [0, 5, 11]


@pytest.mark.parametrize("family,side", [("gpt2", "left"), ("llama", "right"), ("opt", "right")])
def test_position_buckets_match_float64_reference(family, side):
    model = build(family)
    inputs = batch(side=side)
    stages = capture_stages(model, family, inputs)
    report = run_tracker(model, inputs, position_buckets=EDGES)
    assert [list(row) for row in report.positions] == [list(POSITION_KEYS)] * (len(EDGES) * len(report.rows))
    assert [(r["site"], r["bucket"]) for r in report.positions] == [
        (site, label) for site in stages for label in ("0-5", "5-11", "11-inf")
    ]
    for row in report.positions:
        ref = stages[row["site"]]
        end = row["position_end"] if row["position_end"] is not None else math.inf
        chosen = (ref["positions"] >= row["position_start"]) & (ref["positions"] < end)
        assert row["tokens"] == int(chosen.sum()) > 0
        assert row["dim"] == FFN
        expected = activation_metrics(ref["pre"][chosen], ref["post"][chosen])
        for name in METRIC_NAMES:
            assert row[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), (row["site"], row["bucket"], name)
        for got, rows in zip(report.position_eigenvalues[(row["site"], row["bucket"])], (ref["pre"], ref["post"])):
            want = np.linalg.eigvalsh(two_pass(rows[chosen]))[::-1]  # the bucket's spectrum, float64, descending
            assert got.dtype == torch.float64 and np.allclose(got.numpy(), want, rtol=1e-4, atol=1e-6 * want[0])
    assert len(report.position_eigenvalues) == len(report.positions)
    # the overall rows are the tracker's usual ones, and the buckets partition their tokens
    assert [row["tokens"] for row in report.rows] == [sum(LENGTHS)] * len(report.rows)
    assert sum(r["tokens"] for r in report.positions if r["site"] == "ffn.0") == sum(LENGTHS)
    assert list(report.rows[0]) == list(ROW_KEYS)


def test_position_buckets_left_padding_equals_unpadded_sequences():
    """Positions count real tokens, so left padding (with position ids) puts each token in the bucket it
    has in its sequence alone."""
    model = build("gpt2")
    padded = batch(side="left")
    left = run_tracker(model, padded, position_buckets=EDGES)
    single = run_tracker(model, *unpadded(padded), position_buckets=EDGES)
    for a, b in zip(left.positions, single.positions):
        assert (a["site"], a["bucket"], a["tokens"]) == (b["site"], b["bucket"], b["tokens"])
        for name in METRIC_NAMES:
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6)


def test_position_buckets_without_mask_use_the_sequence_index_and_skip_leading_positions():
    model = build("gpt2")
    inputs = batch(lengths=(13, 13, 13))
    report = run_tracker(model, {"input_ids": inputs["input_ids"]}, position_buckets=[2, 7])
    assert [(r["bucket"], r["tokens"]) for r in report.positions[:2]] == [("2-7", 15), ("7-inf", 18)]
    assert bucket_labels([2, 7]) == [("2-7", 2, 7), ("7-inf", 7, None)]
    keys = report.to_log_dict()
    assert "nerve/ffn.0/pr_pre.pos2-7" in keys and "nerve/mean/js.pos7-inf" in keys


@pytest.mark.parametrize("bad", [[], [3, 3], [5, 2], [-1, 4], "0,16", [0, 1.5], [True, 3]])
def test_position_buckets_are_checked(bad):
    with pytest.raises((TypeError, ValueError), match="position_buckets"):
        FFNTracker(build("gpt2"), position_buckets=bad, flow=False)


def test_memory_budget_counts_buckets_flow_and_pairs():
    model = build("gpt2")  # 2 FFNs, D = 37, d = 32
    D, d, B = FFN, HIDDEN, 3
    per_ffn = (1 + B) * 2 * (D * D + D) * 8 + 2 * (d * d + d) * 8
    needed = 2 * per_ffn + (d * d + 2 * d) * 8  # one adjacent pair
    options = dict(flow=True, position_buckets=[0, 4, 8], cross_layer="adjacent")
    FFNTracker(model, memory_budget_mb=needed / 2**20 * 1.0001, **options)
    with pytest.raises(MemoryBudgetError, match="position buckets"):
        FFNTracker(model, memory_budget_mb=needed / 2**20 * 0.9999, **options)


# ----------------------------------------------------------------------------- 3. cross-layer coherence
def test_cross_layer_js_and_cka_match_float64_reference():
    model = build("gpt2")
    inputs = batch(side="left")
    stages = capture_stages(model, "gpt2", inputs)
    report = run_tracker(model, inputs, cross_layer="adjacent")
    assert all(list(row) == list(ROW_KEYS) for row in report.rows)  # CKA alone adds no flow columns
    (row,) = report.cross_layer
    a, b = stages["ffn.0"], stages["ffn.1"]
    assert (row["site_a"], row["site_b"], row["layer_a"], row["layer_b"]) == ("ffn.0", "ffn.1", 0, 1)
    assert row["tokens"] == sum(LENGTHS)
    assert row["cka"] == pytest.approx(cka_reference(a["input"], b["input"]), rel=1e-6)
    for side in ("pre", "post"):
        want = float(jensenshannon(spectrum(a[side])["p"], spectrum(b[side])["p"]) ** 2)
        assert row[f"js_{side}"] == pytest.approx(want, rel=1e-4, abs=1e-8), side
    keys = report.to_log_dict()
    assert keys["nerve/ffn.0/cka_next"] == row["cka"] and "nerve/ffn.1/cka_next" not in keys


def test_cross_layer_all_pairs_with_token_cap_over_several_forwards():
    """3 layers, every pair, max_tokens cutting the second forward: CKA of exactly the first 30 tokens."""
    model = tiny_gpt2(n_layer=3).eval()
    generator = torch.Generator().manual_seed(3)
    forwards = [{"input_ids": torch.randint(1, 61, (2, 9), generator=generator)} for _ in range(2)]
    captured = {}
    hooks = [
        block.mlp.register_forward_pre_hook(lambda m, args, i=i: captured.setdefault(i, []).append(args[0].double()))
        for i, block in enumerate(model.transformer.h)
    ]
    with torch.no_grad():
        for inputs in forwards:
            model(**inputs)
    for hook in hooks:
        hook.remove()
    rows = {i: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs])[:30].numpy() for i, xs in captured.items()}
    report = run_tracker(model, *forwards, cross_layer="all", max_tokens=30)
    assert [(r["layer_a"], r["layer_b"]) for r in report.cross_layer] == [(0, 1), (0, 2), (1, 2)]
    for row in report.cross_layer:
        assert row["tokens"] == 30
        assert row["cka"] == pytest.approx(cka_reference(rows[row["layer_a"]], rows[row["layer_b"]]), rel=1e-6)
    matrix = layer_matrix(report.rows, report.cross_layer, "cka")
    assert matrix.shape == (3, 3) and matrix.loc[2, 0] == report.cross_layer[1]["cka"] and matrix.loc[1, 1] == 1.0


def test_cross_layer_choice_is_checked():
    with pytest.raises(ValueError, match="cross_layer"):
        FFNTracker(build("gpt2"), cross_layer="neighbours", flow=False)


# ----------------------------------------------------------------------------- the accumulator
def test_cross_covariance_streaming_merge_and_state_are_exact():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(301, 7, generator=generator, dtype=torch.float64) * 0.3 + 50.0  # large mean, small spread
    y = x[:, :5] @ torch.randn(5, 11, generator=generator, dtype=torch.float64) + 3.0
    y = y + 0.1 * torch.randn(301, 11, generator=generator, dtype=torch.float64)
    xc, yc = x.numpy() - x.numpy().mean(0), y.numpy() - y.numpy().mean(0)
    want = xc.T @ yc / 300

    whole = CrossCovarianceAccumulator(7, 11)
    whole.update(x, y)
    left, right = CrossCovarianceAccumulator(7, 11), CrossCovarianceAccumulator(7, 11)
    for start in range(0, 200, 37):
        left.update(x[start : min(start + 37, 200)], y[start : min(start + 37, 200)])
    right.update(x[200:], y[200:])
    merged = left.merge(right)
    for acc in (whole, merged):
        assert acc.count == 301
        np.testing.assert_allclose(acc.cross_covariance().numpy(), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(acc.mean()[1].numpy(), y.numpy().mean(0), rtol=1e-12)
    fp32 = CrossCovarianceAccumulator(7, 11)
    for part in range(0, 301, 64):
        fp32.update(x[part : part + 64].float(), y[part : part + 64].float())
    np.testing.assert_allclose(fp32.cross_covariance().numpy(), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())

    restored = CrossCovarianceAccumulator(7, 11)
    restored.load_state_dict(merged.state_dict())
    assert torch.equal(restored.scatter(), merged.scatter()) and restored.count == 301
    bad = merged.state_dict()
    bad["cross"] = bad["cross"][:, :3]
    with pytest.raises(ValueError, match="cross"):
        restored.load_state_dict(bad)
    with pytest.raises(ValueError, match="widths"):
        CrossCovarianceAccumulator(7, 10).load_state_dict(merged.state_dict())
    assert restored.count == 301  # a refused state changes nothing


def test_cross_covariance_skips_nonfinite_pairs_and_cka_bounds():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=generator)
    y = torch.randn(40, 4, generator=generator)
    y[5, 2] = float("nan")
    acc = CrossCovarianceAccumulator(3, 4)
    acc.update(x, y)
    assert (acc.count, acc.skipped) == (39, 1)
    keep = torch.ones(40, dtype=torch.bool)
    keep[5] = False
    xc = x[keep].double() - x[keep].double().mean(0)
    np.testing.assert_allclose(
        acc.scatter().numpy(), (xc.T @ (y[keep].double() - y[keep].double().mean(0))).numpy(), rtol=1e-5, atol=1e-6
    )
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    xd = x.double() - x.double().mean(0)
    assert linear_cka(xd.T @ (xd @ q), xd.T @ xd, q.T @ xd.T @ xd @ q) == pytest.approx(1.0, rel=1e-12)
    assert math.isnan(linear_cka(torch.zeros(3, 3), torch.zeros(3, 3), torch.eye(3)))
    with pytest.raises(ValueError, match="same rows"):
        acc.update(x, y[:10])


@pytest.mark.distributed
def test_two_processes_equal_one(tmp_path):
    """2 gloo processes, uneven shares: cross-covariance sync, and a tracker with flow, position buckets and
    cross_layer, give the numbers of one process on all the tokens."""
    out = tmp_path / "synced.pt"
    torchrun("coherence_sync.py", str(out))
    synced = torch.load(out)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(501, 9, generator=generator, dtype=torch.float64) + 4.0
    y = torch.randn(501, 6, generator=generator, dtype=torch.float64) + x[:, :6]
    one = CrossCovarianceAccumulator(9, 6)
    one.update(x, y)
    assert synced["count"] == 501 and synced["local_kept"]
    torch.testing.assert_close(synced["cross"], one.cross_covariance(), rtol=1e-12, atol=1e-12)

    from workers.coherence_sync import forwards, tracker_options

    model = tiny_gpt2(seed=0).double().eval()
    report = run_tracker(model, *forwards(), **tracker_options())
    for got, want in (
        (synced["rows"], report.rows),
        (synced["positions"], report.positions),
        (synced["cross_layer"], report.cross_layer),
    ):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert set(a) == set(b)
            for key, value in b.items():
                if isinstance(value, float):
                    assert a[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key
                else:
                    assert a[key] == value, key


def test_sync_free_device_path_gives_the_host_numbers(monkeypatch):
    """On accelerators the tracker keeps all rows with a mask (no host sync); run that path on the CPU and
    compare flow, position buckets and CKA with the host path, padding and a token cap included."""
    from nerve_hf.stats.covariance import CovarianceAccumulator

    model = build("gpt2")
    inputs = [batch(side="left"), batch(lengths=(9, 16, 3), side="right", seed=1)]
    options = dict(flow=True, position_buckets=EDGES, cross_layer="adjacent", max_tokens=60)
    host = run_tracker(model, *inputs, **options)
    monkeypatch.setattr(CovarianceAccumulator, "HOST_SYNC_DEVICE_TYPES", ())
    device = run_tracker(model, *inputs, **options)
    for got, want in (
        (device.rows, host.rows),
        (device.positions, host.positions),
        (device.cross_layer, host.cross_layer),
    ):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            for key, value in b.items():
                if isinstance(value, float):
                    assert float(a[key]) == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), key
                else:
                    assert a[key] == value, key
    assert host.rows[0]["tokens"] == 60 and sum(r["tokens"] for r in host.positions if r["site"] == "ffn.0") == 60
