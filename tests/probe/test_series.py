"""`nerve probe` over a checkpoint series: real tiny GPT-2 checkpoints saved between SGD steps, each
series row checked against a single probe of its checkpoint, the loss against a direct computation."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from nerve_hf.cli import main
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.probe.series import expand_series, parse_step
from nerve_hf.report import ROW_KEYS

TEXT = "\n".join(
    f"def function_{i}(value, other={i}):\n    result = value * {i} + other\n    return str(result) + 'x{i % 7}'\n"
    for i in range(40)
)
ARGS = ["--max-tokens", "150", "--seq-len", "20", "--batch-size", "3", "--no-progress", "--no-flow"]  # pre/post only
STEPS = (2, 4, 10)


def _tokenizer(extra: str = ""):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT + extra], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")


def _gpt2(tokenizer, n_layer: int = 2):
    from trainer_helpers import tiny_gpt2

    return tiny_gpt2(vocab_size=len(tokenizer), n_positions=32, n_layer=n_layer, bos_token_id=1, eos_token_id=1)


def _train_and_save(folder: Path, steps=STEPS, n_layer: int = 2) -> list[Path]:
    """SGD on random token sequences; ``save_pretrained`` (with the tokenizer) at each of ``steps``."""
    tokenizer = _tokenizer()
    model = _gpt2(tokenizer, n_layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    generator = torch.Generator().manual_seed(3)
    saved, step = [], 0
    for target in steps:
        while step < target:
            ids = torch.randint(2, len(tokenizer), (4, 16), generator=generator)
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
        path = folder / f"checkpoint-{step}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        saved.append(path)
    return saved


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    _train_and_save(folder)
    (folder / "runs").mkdir()  # Trainer run folders hold other things too
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "code.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def single(run_dir, text_file, tmp_path_factory):
    """report.json of a single probe of every checkpoint, by step."""
    out = {}
    for step in STEPS:
        target = tmp_path_factory.mktemp(f"single{step}")
        assert (
            main(
                [
                    "probe",
                    str(run_dir / f"checkpoint-{step}"),
                    "--text-file",
                    str(text_file),
                    "--out",
                    str(target),
                    *ARGS,
                ]
            )
            == 0
        )
        out[step] = (json.loads((target / "report.json").read_text()), target)
    return out


@pytest.fixture(scope="module")
def series_dir(run_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("series")
    args = [a for a in ARGS if a != "--no-progress"]
    assert main(["probe", str(run_dir), "--text-file", str(text_file), "--out", str(out), "--eval-loss", *args]) == 0
    return out


def one_error_line(captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def assert_close(a, b, tol=1e-9):
    if isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    else:
        assert a == pytest.approx(b, rel=tol, abs=tol)


def direct_loss(checkpoint: Path, text: str) -> float:
    """Mean next-token loss over the same tokens, one unpadded sequence at a time through the model's own
    ``labels=`` loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nerve_hf.probe.inputs import tokenize_documents

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    made = tokenize_documents([text], tokenizer, 20, 3, 150)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in made.batches:
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                ids = ids[mask.bool()][None]  # [1, T]
                n = ids.shape[1] - 1
                total += float(model(input_ids=ids, labels=ids).loss) * n
                count += n
    return total / count


# ------------------------------------------------------------------------------------------ tests
def test_series_rows_equal_single_probes_and_loss_equals_direct(run_dir, text_file, single, series_dir):
    frame = pd.read_csv(series_dir / "series.csv")
    assert list(frame.columns) == ["checkpoint", "step", *ROW_KEYS, "loss"]
    assert list(dict.fromkeys(frame["step"])) == list(STEPS)  # numeric step order: 10 after 4
    assert list(dict.fromkeys(frame["checkpoint"])) == [f"checkpoint-{s}" for s in STEPS]
    content = json.loads((series_dir / "series.json").read_text())
    assert [c["step"] for c in content["checkpoints"]] == list(STEPS)
    for entry in content["checkpoints"]:
        report, folder = single[entry["step"]]
        assert len(entry["rows"]) == len(report["rows"]) == 2
        for got, want in zip(entry["rows"], report["rows"]):
            assert got["site"] == want["site"] and got["tokens"] == want["tokens"] == 150
            for name in METRIC_NAMES:
                assert_close(got[name], want[name])
        csv_rows = frame[frame["step"] == entry["step"]]
        for (_, got), want in zip(csv_rows.iterrows(), report["rows"]):
            for name in METRIC_NAMES:
                assert_close(float(got[name]), want[name])
        # the spectra: one archive per checkpoint, the same arrays as the single probe's eigenvalues.npz
        with (
            np.load(series_dir / "spectra" / f"{entry['checkpoint']}.npz") as got,
            np.load(folder / "eigenvalues.npz") as want,
        ):
            assert sorted(got.files) == sorted(want.files) == ["ffn.0/post", "ffn.0/pre", "ffn.1/post", "ffn.1/pre"]
            for key in want.files:
                np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=0)
        loss = direct_loss(run_dir / entry["checkpoint"], TEXT)
        assert entry["loss"] == pytest.approx(loss, rel=1e-5)
        assert (csv_rows["loss"] == entry["loss"]).all()
    losses = [c["loss"] for c in content["checkpoints"]]
    assert len(set(losses)) == 3  # training moved the loss


def test_series_correlations_equal_scipy(series_dir):
    frame = pd.read_csv(series_dir / "series.csv")
    corr = pd.read_csv(series_dir / "series_correlations.csv")
    assert list(corr.columns) == ["site", "metric", "r", "p", "n"]
    assert list(dict.fromkeys(corr["site"])) == ["mean", "ffn.0", "ffn.1"]
    loss = frame.drop_duplicates("step")["loss"].to_numpy()
    for row in corr.itertuples():
        if row.site == "mean":
            x = frame.groupby("step", sort=False)[row.metric].mean().to_numpy()
        else:
            x = frame[frame["site"] == row.site][row.metric].to_numpy()
        assert row.n == 3
        assert row.r == pytest.approx(stats.pearsonr(x, loss).statistic, abs=1e-9)


def test_series_plots_and_progress(run_dir, text_file, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "s"
    assert main(["probe", str(run_dir), "--text-file", str(text_file), "--out", str(out), "--max-tokens", "60"]) == 0
    captured = capsys.readouterr()
    assert "checkpoint 3 of 3" in captured.err
    assert "3 checkpoints of GPT2LMHeadModel" in captured.out
    for name in ("series_trajectories.png", "series_heatmaps.png"):
        with Image.open(out / name) as image:
            assert image.size[0] > 400
    assert not (out / "series_correlations.csv").exists()  # no loss, no correlations
    assert "loss" not in pd.read_csv(out / "series.csv").columns


def test_several_model_paths_keep_their_order_and_positions(run_dir, text_file, single, tmp_path):
    a, b = tmp_path / "late", tmp_path / "early"
    shutil.copytree(run_dir / "checkpoint-10", a)
    shutil.copytree(run_dir / "checkpoint-2", b)
    out = tmp_path / "o"
    assert main(["probe", str(a), str(b), "--text-file", str(text_file), "--out", str(out), "--no-plots", *ARGS]) == 0
    content = json.loads((out / "series.json").read_text())
    assert [(c["checkpoint"], c["step"]) for c in content["checkpoints"]] == [("late", 0), ("early", 1)]
    for entry, step in zip(content["checkpoints"], (10, 2)):
        for got, want in zip(entry["rows"], single[step][0]["rows"]):
            for name in METRIC_NAMES:
                assert_close(got[name], want[name])
    assert sorted(p.name for p in (out / "spectra").iterdir()) == ["early.npz", "late.npz"]


def test_step_parsing_and_expansion(run_dir):
    assert parse_step("checkpoint-1500") == 1500 and parse_step("step143000") == 143000
    assert parse_step("step-7") == 7 and parse_step("main") is None and parse_step("v1.0") is None
    found = expand_series(["org/model"], ["step1000", "main", "step3000"])
    assert [(c.revision, c.name, c.step) for c in found] == [
        ("step1000", "step1000", 1000),
        ("main", "main", 1),
        ("step3000", "step3000", 3000),
    ]
    assert [c.step for c in expand_series([str(run_dir)])] == list(STEPS)


def _hub_revisions(hub, repo_id: str, folders: dict[str, Path]) -> None:
    """A Hub cache holding one commit per revision, ``refs/<revision>`` pointing to it (as after a download
    of each revision)."""
    repo = hub.root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for i, (revision, folder) in enumerate(folders.items()):
        commit = f"{i + 1:040x}"
        (repo / "refs" / revision).write_text(commit)
        shutil.copytree(folder, repo / "snapshots" / commit)


def test_hub_revisions_offline_equal_the_local_checkpoints(run_dir, text_file, single, hub, tmp_path):
    _hub_revisions(hub, "tiny-org/pythia-like", {f"step{s}": run_dir / f"checkpoint-{s}" for s in STEPS})
    out = tmp_path / "o"
    rev = ",".join(f"step{s}" for s in STEPS)
    args = ["--text-file", str(text_file), "--out", str(out), "--no-plots", *ARGS]
    assert main(["probe", "tiny-org/pythia-like", "--revision", rev, *args]) == 0
    content = json.loads((out / "series.json").read_text())
    assert [c["step"] for c in content["checkpoints"]] == list(STEPS)
    assert [c["model"]["revision"] for c in content["checkpoints"]] == [f"step{s}" for s in STEPS]
    for entry in content["checkpoints"]:
        for got, want in zip(entry["rows"], single[entry["step"]][0]["rows"]):
            for name in METRIC_NAMES:
                assert_close(got[name], want[name])
    # one revision is a single probe, as before
    one = tmp_path / "one"
    assert (
        main(
            [
                "probe",
                "tiny-org/pythia-like",
                "--revision",
                "step4",
                "--text-file",
                str(text_file),
                "--out",
                str(one),
                "--no-plots",
                *ARGS,
            ]
        )
        == 0
    )
    report = json.loads((one / "report.json").read_text())
    assert report["settings"]["revision"] == "step4" and report["model"]["revision"] == "step4"
    assert report["rows"] == single[4][0]["rows"]


def test_missing_revision_is_one_line(run_dir, text_file, hub, tmp_path, capsys):
    _hub_revisions(hub, "tiny-org/pythia-like", {"step2": run_dir / "checkpoint-2"})
    out = tmp_path / "o"
    args = ["--text-file", str(text_file), "--out", str(out), *ARGS]
    assert main(["probe", "tiny-org/pythia-like", "--revision", "step2,step99", *args]) == 2
    line = one_error_line(capsys.readouterr())
    assert "'step99'" in line and "'tiny-org/pythia-like'" in line
    assert not (out / "series.csv").exists()


def test_run_dir_without_checkpoints_and_mixed_architectures(run_dir, text_file, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    assert main(["probe", str(empty), str(run_dir), "--text-file", str(text_file), *ARGS]) == 2
    line = one_error_line(capsys.readouterr())
    assert "checkpoint-N" in line and str(empty) in line

    mixed = tmp_path / "mixed"
    shutil.copytree(run_dir / "checkpoint-2", mixed / "checkpoint-2")
    _train_and_save(mixed, steps=(5,), n_layer=3)
    out = tmp_path / "o"
    assert main(["probe", str(mixed), "--text-file", str(text_file), "--out", str(out), *ARGS]) == 2
    line = one_error_line(capsys.readouterr())
    assert line.startswith("nerve probe: error: mixed architectures in one series") and "checkpoint-5" in line

    other = tmp_path / "other_tokenizer"
    shutil.copytree(run_dir / "checkpoint-2", other / "checkpoint-2")
    shutil.copytree(run_dir / "checkpoint-4", other / "checkpoint-4")
    _tokenizer(extra="\nzebra quokka xylophone\n" * 20).save_pretrained(other / "checkpoint-4")
    assert main(["probe", str(other), "--text-file", str(text_file), "--out", str(out), *ARGS]) == 2
    line = one_error_line(capsys.readouterr())
    assert "mixed architectures in one series" in line and "tokenizer" in line


def test_run_dir_with_a_final_model_is_a_series(run_dir, text_file, single, tmp_path, capsys):
    """The Trainer saves its final model (config.json) beside the checkpoint-N folders: still a series (issue #29),
    and the probe says so and how to probe the final model alone."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(run / "checkpoint-10" / name, run / name)  # the final model = the last checkpoint here
    out = tmp_path / "o"
    assert main(["probe", str(run), "--text-file", str(text_file), "--out", str(out), "--no-plots", *ARGS]) == 0
    printed = capsys.readouterr().out
    assert f"{run} holds 3 checkpoints (checkpoint-2 ... checkpoint-10) and a final model (config.json)" in printed
    assert f"the final model alone: nerve probe {run} --no-series" in printed
    content = json.loads((out / "series.json").read_text())
    assert [(c["checkpoint"], c["step"]) for c in content["checkpoints"]] == [(f"checkpoint-{s}", s) for s in STEPS]
    alone = tmp_path / "alone"
    assert main(["probe", str(run), "--no-series", "--text-file", str(text_file), "--out", str(alone), *ARGS]) == 0
    assert not (alone / "series.json").exists()
    rows = json.loads((alone / "report.json").read_text())["rows"]
    for got, want in zip(rows, single[10][0]["rows"]):
        for name in METRIC_NAMES:
            assert_close(got[name], want[name])


def test_two_checkpoints_say_r_needs_three_points(run_dir, text_file, tmp_path, capsys):
    out = tmp_path / "two"
    two = [str(run_dir / "checkpoint-2"), str(run_dir / "checkpoint-4")]
    assert (
        main(["probe", *two, "--text-file", str(text_file), "--out", str(out), "--eval-loss", "--no-plots", *ARGS]) == 0
    )
    assert "2 checkpoints: Pearson r needs at least 3 points" in capsys.readouterr().out
    table = pd.read_csv(out / "series_correlations.csv")
    assert table["r"].isna().all() and (table["n"] == 2).all()


def test_report_records_the_split_read(run_dir, text_file, tmp_path):
    out = tmp_path / "embedded"
    checkpoint = str(run_dir / "checkpoint-2")
    assert main(["probe", checkpoint, "--out", str(out), "--no-plots", *ARGS]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["dataset_split"] == report["data"]["split"] == "validation"  # 150 tokens of it
    out = tmp_path / "file"
    assert main(["probe", checkpoint, "--text-file", str(text_file), "--out", str(out), "--no-plots", *ARGS]) == 0
    assert json.loads((out / "report.json").read_text())["settings"]["dataset_split"] is None
