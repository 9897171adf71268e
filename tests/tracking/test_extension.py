"""Extending the tracker: a measurement and a token source of one's own, each a small class, nothing else edited.

Both are checked against float64 references computed from hooks of the test's own on the FFN modules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import activation_metrics
from test_tracker import LENGTHS, batch, build

from nerve_hf.tracking.measurements.base import Measurement
from nerve_hf.tracking.tokens import TokenSource
from nerve_hf.tracking.tracker import FFNTracker


class MeanNorm(Measurement):
    """Mean L2 norm of the pre and post rows of each site: row keys ``mean_norm_pre``, ``mean_norm_post``."""

    name, stages = "mean_norm", ("pre", "post")

    def bind(self, table):
        super().bind(table)
        self.reset()

    def update(self, site, stage, rows, keep, positions):
        norms = rows.double().norm(dim=-1)  # [N]
        if keep is not None:
            norms = norms[keep]
        total, count = self.sums[site][stage]
        self.sums[site][stage] = (total + float(norms.sum()), count + norms.numel())

    def reset(self):
        self.sums = [{"pre": (0.0, 0), "post": (0.0, 0)} for _ in self.table.sites]

    def compute(self, report, context):
        for row, i in zip(report.rows, context.watched):
            for stage, (total, count) in self.sums[i].items():
                row[f"mean_norm_{stage}"] = total / count if count else float("nan")


class EvenPositions(TokenSource):
    """Only the rows at even sequence positions count (every sample, padding included)."""

    def select(self, x):
        return x[:, ::2].reshape(-1, x.shape[-1]), None  # [B * ceil(T / 2), D]

    def positions(self, x):
        return torch.arange(0, x.shape[1], 2).repeat(x.shape[0])


def captured_pre_post(model, inputs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """site -> (pre, post) float64 activations [B, T, D] of GPT-2's FFNs, from hooks on c_fc and c_proj."""
    captured, hooks = {}, []
    for layer, block in enumerate(model.transformer.h):
        site = captured.setdefault(f"ffn.{layer}", {})

        def pre(module, args, output, site=site):
            site["pre"] = output.detach().double().numpy()

        def post(module, args, site=site):
            site["post"] = args[0].detach().double().numpy()

        hooks += [block.mlp.c_fc.register_forward_hook(pre), block.mlp.c_proj.register_forward_pre_hook(post)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (stages["pre"], stages["post"]) for name, stages in captured.items()}


@pytest.mark.parametrize("given", ["class", "instance"])
def test_a_measurement_of_ones_own_lands_in_the_rows_over_real_tokens_only(given):
    model = build("gpt2")
    inputs = batch(side="left")  # padded batch: padding must not reach the measurement
    captured = captured_pre_post(model, inputs)
    real = inputs["attention_mask"].bool().numpy()  # [B, T]
    tracker = FFNTracker(model, measurements=[MeanNorm if given == "class" else MeanNorm()])
    with tracker, torch.no_grad():
        model(**inputs)
    report = tracker.compute()
    assert [row["site"] for row in report.rows] == ["ffn.0", "ffn.1"]
    for row in report.rows:
        assert row["tokens"] == sum(LENGTHS)
        for stage, activations in zip(("pre", "post"), captured[row["site"]]):
            want = np.linalg.norm(activations[real], axis=-1).mean()  # float64, real tokens only
            assert row[f"mean_norm_{stage}"] == pytest.approx(want, rel=1e-6)
    tracker.reset()
    assert all(np.isnan(row["mean_norm_pre"]) for row in tracker.compute().rows)


def test_each_window_gets_its_own_measurement_state():
    from nerve_hf.tracking.windows import Window

    model = build("gpt2")
    inputs = batch()
    windows = [Window("train", when=lambda m: m.training), Window("eval", when=lambda m: not m.training)]
    tracker = FFNTracker(model, windows=windows, measurements=[MeanNorm()])
    with tracker, torch.no_grad():
        model(**inputs)  # eval mode: the eval window records
    assert all(np.isnan(row["mean_norm_pre"]) for row in tracker.compute(window="train").rows)
    assert all(row["mean_norm_pre"] > 0 for row in tracker.compute(window="eval").rows)


def test_a_token_source_of_ones_own_decides_the_rows():
    model = build("gpt2")
    inputs = {"input_ids": batch()["input_ids"]}  # no mask: the token source alone decides
    captured = captured_pre_post(model, inputs)
    tracker = FFNTracker(model, token_source=EvenPositions(), position_buckets=[0, 4])
    with tracker, torch.no_grad():
        model(**inputs)
    report = tracker.compute()
    batch_size, seq = inputs["input_ids"].shape
    even = batch_size * len(range(0, seq, 2))
    for row in report.rows:
        pre, post = (x[:, ::2].reshape(-1, x.shape[-1]) for x in captured[row["site"]])  # float64 [N, D]
        assert row["tokens"] == even == pre.shape[0]
        want = activation_metrics(pre, post)
        for name in ("pr_pre", "pr_post", "se_pre", "se_post"):  # N = 36 < D: JS rests on round-off tails
            assert row[name] == pytest.approx(want[name], rel=1e-5), name
    first = [r["tokens"] for r in report.positions if r["site"] == "ffn.0"]
    assert first == [batch_size * 2, batch_size * len(range(4, seq, 2))]  # positions 0, 2 | 4, 6, ...
