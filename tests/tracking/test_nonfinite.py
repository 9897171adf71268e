"""Rows holding NaN or Inf in a real forward: left out of every statistic, one warning per measurement.

NaN and Inf are written by a hook into some rows of the last block's FFN input (so earlier blocks stay
finite); the reference captures pre (``c_fc`` output) and post (``c_proj`` input) with its own hooks,
keeps the real tokens, drops the non-finite rows and computes the metrics in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from reference import activation_metrics
from trainer_helpers import VOCAB, tiny_gpt2

from nerve_hf.report import METRIC_NAMES
from nerve_hf.tracking.tracker import FFNTracker

BAD = [(0, 2), (1, 5), (1, 8)]  # (sample, position): NaN row, one Inf entry, NaN in a padded position


def poison(module, args):
    x = args[0].clone()  # [B, T, d]
    x[BAD[0]] = float("nan")
    x[BAD[1] + (3,)] = float("inf")
    x[BAD[2]] = float("nan")
    return (x,)


def batch():
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0  # sample 1 is 7 tokens long: position 8 is padding
    return {"input_ids": ids, "attention_mask": mask}


def reference_rows(model, inputs, forwards: int):
    """{site: (pre, post)} float64 over real, finite rows, and {site: non-finite real rows}, own hooks."""
    captured = {}

    def keep(name, index):
        def hook(module, args, output=None):
            tensor = output if index == "out" else args[0]
            captured.setdefault(name, []).append(tensor.detach().double())

        return hook

    handles = []
    for layer, block in enumerate(model.transformer.h):
        handles.append(block.mlp.c_fc.register_forward_hook(keep(f"pre{layer}", "out")))
        handles.append(block.mlp.c_proj.register_forward_pre_hook(keep(f"post{layer}", "in")))
    with torch.no_grad():
        for _ in range(forwards):
            model(**inputs)
    for handle in handles:
        handle.remove()
    real = inputs["attention_mask"].bool()
    rows, bad = {}, {}
    for layer in range(len(model.transformer.h)):
        pre = torch.cat([t[real] for t in captured[f"pre{layer}"]]).numpy()
        post = torch.cat([t[real] for t in captured[f"post{layer}"]]).numpy()
        finite_pre, finite_post = np.isfinite(pre).all(1), np.isfinite(post).all(1)
        both = finite_pre & finite_post
        rows[f"ffn.{layer}"] = (pre[both], post[both])
        bad[f"ffn.{layer}"] = (int((~finite_pre).sum()), int((~finite_post).sum()))
    return rows, bad


@pytest.mark.parametrize("forwards", [1, 2])
def test_nonfinite_rows_warn_once_per_measurement_and_metrics_cover_the_finite_rows(forwards):
    model = tiny_gpt2().eval()
    model.transformer.h[1].mlp.register_forward_pre_hook(poison)
    inputs = batch()
    reference, bad = reference_rows(model, inputs, forwards)
    assert bad == {"ffn.0": (0, 0), "ffn.1": (2 * forwards, 2 * forwards)}  # the padded NaN is not a real row

    tracker = FFNTracker(model, flow=True, position_buckets=[0, 4], cross_layer="adjacent")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker, torch.no_grad():
            for _ in range(forwards):
                model(**inputs)
        report = tracker.compute()
    runtime = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    skipped = [m for m in runtime if "NaN or Inf" in m]
    assert len(skipped) == 1, runtime  # one for every statistic of every site, not one per accumulator
    n = 2 * forwards
    assert skipped[0] == (
        f"non-finite activations skipped: {n} rows holding NaN or Inf at 1 site in window 'default' "
        f"(ffn.1: {n} rows; input {n}, pre {n}, post {n}, output {n}, input paired with ffn.0 {n}); "
        "every statistic covers only its finite rows (a row's tokens count them)"
    )

    rows = {row["site"]: row for row in report.rows}
    for site, (pre, post) in reference.items():
        assert rows[site]["tokens"] == pre.shape[0]
        expected = activation_metrics(pre, post)
        for name in METRIC_NAMES:
            assert rows[site][name] == pytest.approx(expected[name], rel=1e-5, abs=1e-9), (site, name)
    assert rows["ffn.1"]["tokens"] == forwards * (9 + 7) - n
    assert [row["tokens"] for row in report.cross_layer] == [forwards * 16 - n]


def test_a_clean_measurement_after_a_nonfinite_one_warns_nothing():
    model = tiny_gpt2().eval()
    handle = model.transformer.h[1].mlp.register_forward_pre_hook(poison)
    tracker = FFNTracker(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracker, torch.no_grad():
            model(**batch())
        tracker.compute()
        handle.remove()
        tracker.reset()
        with tracker, torch.no_grad():
            model(**batch())
        tracker.compute()
    assert len([w for w in caught if "NaN or Inf" in str(w.message)]) == 1


def test_a_trainer_evaluation_with_nan_rows_warns_once_and_logs_the_finite_tokens(tmp_path):
    """Through NerveCallback: NaN written into one row of each eval batch (eval-mode forwards only, so training
    stays finite); the eval window warns once, the train windows not at all, and the records count the rest."""
    from trainer_helpers import make_trainer

    from nerve_hf import NerveCallback
    from nerve_hf.sinks.records import read_records

    model = tiny_gpt2()
    poisoned = []

    def poison_eval(module, args):
        if module.training:
            return None
        poisoned.append(args[0].shape[0])
        x = args[0].clone()  # [B, T, d]
        x[0, 2] = float("nan")
        return (x,)

    model.transformer.h[1].mlp.register_forward_pre_hook(poison_eval)
    callback = NerveCallback(every_n_steps=1, flow=True)
    trainer = make_trainer(tmp_path, [callback], model=model, max_steps=1, eval_strategy="steps", eval_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    skipped = [str(w.message) for w in caught if "NaN or Inf" in str(w.message)]
    k = len(poisoned)  # eval batches: one NaN row each
    assert k == 2 and skipped == [
        f"non-finite activations skipped: {k} rows holding NaN or Inf at 1 site in window 'eval' "
        f"(ffn.1: {k} rows; input {k}, pre {k}, post {k}, output {k}); every statistic covers only its finite "
        "rows (a row's tokens count them)"
    ]
    evals = {r["site"]: r for r in read_records(tmp_path / "nerve_metrics.jsonl") if r["split"] == "eval"}
    assert evals["ffn.1"]["tokens"] == evals["ffn.0"]["tokens"] - k and np.isfinite(evals["ffn.1"]["se_pre"])
