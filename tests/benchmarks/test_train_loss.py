"""The zoo's eval loss is the mean next-token cross-entropy over the predicted tokens (issue #29): checked against
a float64 computation on the evaluation blocks, with the (T-1)/T factor of result schema 1 shown where the model
names no loss type; and a result file of schema 1 is never completed with runs of schema 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _settings  # noqa: E402


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NERVE_HF_CACHE", str(tmp_path / "nerve_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def next_token_loss(model, blocks: torch.Tensor) -> float:
    """float64 log-softmax; position t predicts token t+1; mean over B * (T - 1) predictions."""
    with torch.no_grad():
        logits = model(input_ids=blocks).logits.double()  # [B, T, V]
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # [B, T-1, V]
    return float(-logp.gather(-1, blocks[:, 1:, None]).mean())


@pytest.mark.parametrize("variant", ["gpt2-gelu", "gpt2-normfree-relu", "llama-rope"])
def test_eval_loss_is_the_mean_next_token_loss(tmp_path, variant):
    from _train import build_run
    from transformers import Trainer

    settings = _settings.resolve(
        "smoke", "lm", {"variant": variant, "max_steps": 1, "eval_every": 1, "eval_samples": 5}
    )
    trainer, model, _ = build_run(settings, str(tmp_path / "run"), progress=False)
    model.eval()
    blocks = torch.tensor(trainer.eval_dataset["input_ids"])  # [5, T]
    T = blocks.shape[1]
    assert blocks.shape[0] == 5 and T == settings.block_size
    want = next_token_loss(model, blocks)
    got = trainer.evaluate()["eval_loss"]
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(want * (T - 1) / T, rel=1e-5)
    if variant.startswith("gpt2"):  # what schema 1's GPT-2 files hold: the model named no loss type
        model.loss_type = None
        unnamed = Trainer(model=model, args=trainer.args, eval_dataset=trainer.eval_dataset)
        assert unnamed.evaluate()["eval_loss"] == pytest.approx(want * (T - 1) / T, rel=1e-5)


def test_a_schema_1_file_is_not_completed_with_schema_2_runs(tmp_path):
    import run as bench_run
    from _results import SCHEMA_VERSION

    assert SCHEMA_VERSION == 2
    path = tmp_path / "smoke" / "gpt2_activations.json"
    path.parent.mkdir()
    old = {"schema_version": 1, "experiment": "gpt2_activations", "preset": "smoke", "runs": {"gelu": {}}}
    path.write_text(json.dumps(old))
    for keep in ({"resume": True}, {"runs": ["relu"]}):
        with pytest.raises(SystemExit, match="holds runs of result schema 1, this checkout writes schema 2"):
            bench_run.run_experiment("gpt2_activations", "smoke", tmp_path, progress=False, **keep)
    assert json.loads(path.read_text()) == old


def test_the_results_readme_notes_the_scaled_losses_of_schema_1_files():
    readme = (BENCH / "results" / "README.md").read_text()
    files = sorted((BENCH / "results" / "cpu").glob("gpt2_*.json"))
    assert files and all(json.loads(f.read_text())["schema_version"] == 1 for f in files)
    assert readme.count("**Losses of the GPT-2 runs.**") == 2  # the cpu and cpu-long sections
    assert "(T-1)/T of the mean next-token cross-entropy (T = the context, so 63/64, 127/128)" in readme
