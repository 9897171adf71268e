"""`nerve probe` on checkpoints saved locally: GPT-2 + a locally trained BPE tokenizer, a BERT encoder,
a timm MLP-Mixer; values checked against an FFNTracker run by hand on batches built here."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import assert_rows_equal

from nerve_hf import FFNTracker
from nerve_hf.cli import main
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.probe import probe_model
from nerve_hf.report import ROW_KEYS

ROOT = Path(__file__).resolve().parents[2]

TEXT = "\n".join(
    f"def function_{i}(value, other={i}):\n    result = value * {i} + other\n    return str(result) + 'x{i % 7}'\n"
    for i in range(40)
)


# ------------------------------------------------------------------------------------ fixtures
def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT, "import os\nprint('hello world')\n"], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<unk>")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    from trainer_helpers import tiny_gpt2

    path = tmp_path_factory.mktemp("gpt2")
    tokenizer = _bpe_tokenizer()
    model = tiny_gpt2(vocab_size=len(tokenizer), n_positions=32, bos_token_id=1, eos_token_id=1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("bert")
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    backend.train_from_iterator([TEXT], trainers.WordLevelTrainer(special_tokens=specials))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(1)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=37,
        max_position_embeddings=40,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


MIXER_KWARGS = dict(img_size=32, patch_size=8, embed_dim=24, num_blocks=2, mlp_ratio=(0.5, 1.5), num_classes=5)


@pytest.fixture(scope="module")
def mixer_file(tmp_path_factory):
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("mixer") / "mixer.pth"
    torch.save(MlpMixer(**MIXER_KWARGS).state_dict(), path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "code.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def assert_png(path: Path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 5000, (path, len(data))
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    assert image[..., :3].std() > 0.01  # not a blank canvas


def tracked_rows(model, sequences: list[list[int]], batch_size: int, pad_id: int) -> list[dict]:
    """FFNTracker rows of ``model`` run on ``sequences`` in order, right-padded with ``pad_id`` per batch."""
    return tracked_report(model, sequences, batch_size, pad_id).rows


def tracked_report(model, sequences: list[list[int]], batch_size: int, pad_id: int, **options):
    """:func:`tracked_rows`' whole report, from an ``FFNTracker(model, **options)``."""
    tracker = FFNTracker(model, **options)
    with torch.no_grad(), tracker:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            width = max(map(len, chunk))
            input_ids = torch.full((len(chunk), width), pad_id)  # [B, T]
            mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, T]
            for i, seq in enumerate(chunk):
                input_ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            model(input_ids=input_ids, attention_mask=mask)
    return tracker.compute()


def one_error_line(captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


# ---------------------------------------------------------------------------------------- GPT-2
def test_probe_gpt2_equals_tracker_on_the_same_batches(gpt2_dir, text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    code = main(
        [
            "probe",
            str(gpt2_dir),
            "--text-file",
            str(text_file),
            "--seq-len",
            "24",
            "--batch-size",
            "8",
            "--max-tokens",
            "100000",
            "--out",
            str(out),
            "--no-progress",
            "--no-flow",  # the rows and files without the flow stages
        ]
    )
    assert code == 0
    stdout = capsys.readouterr().out
    assert "ffn.0" in stdout and "ffn.1" in stdout and "mean" in stdout
    report = json.loads((out / "report.json").read_text())

    # The same batches, built here: one document cut into 24-token sequences, right-padded.
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    sequences = [ids[i : i + 24] for i in range(0, len(ids), 24)]
    assert len(ids) % 24 and len(sequences) % 8 > 1  # the last batch holds a short sequence: pads
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    expected = tracked_rows(model, sequences, batch_size=8, pad_id=1)  # pad id: eos (no pad token)
    assert [row["tokens"] for row in expected] == [len(ids), len(ids)]  # pads are not counted
    assert_rows_equal(report["rows"], expected)

    assert report["model"]["class"] == "GPT2LMHeadModel" and report["model"]["location"] == "local"
    assert report["data"]["source"] == "text-file" and report["data"]["tokens"] == len(ids)
    assert report["data"]["sequences"] == len(sequences)
    assert report["settings"]["seq_len_used"] == 24 and report["settings"]["device"] == "cpu"
    assert report["mean"]["pr_pre"] == pytest.approx(sum(r["pr_pre"] for r in expected) / 2, rel=1e-12)

    import pandas as pd

    csv = pd.read_csv(out / "report.csv")
    assert list(csv.columns) == list(ROW_KEYS)
    assert csv["se_post"].tolist() == pytest.approx([r["se_post"] for r in expected], rel=1e-12)
    eigenvalues = __import__("numpy").load(out / "eigenvalues.npz")
    assert eigenvalues["ffn.1/pre"].shape == (37,)
    assert (eigenvalues["ffn.1/pre"][:-1] >= eigenvalues["ffn.1/pre"][1:]).all()
    for name in ("metrics_per_layer.png", "js_per_layer.png", "spectra.png"):
        assert_png(out / name)


def test_probe_default_corpus_caps_tokens_and_respects_layers(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "probe",
            str(gpt2_dir),
            "--max-tokens",
            "150",
            "--seq-len",
            "64",
            "--layers",
            "-1",
            "--out",
            str(out),
            "--no-progress",
            "--no-flow",  # the rows and files without the flow stages
            "--no-plots",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["eigenvalues.npz", "report.csv", "report.json"]
    assert [(r["site"], r["tokens"]) for r in report["rows"]] == [("ffn.1", 150)]
    assert report["data"]["source"] == "embedded:stdlib-code"
    assert report["settings"]["seq_len_used"] == 32  # capped at n_positions
    assert all(math.isfinite(report["rows"][0][name]) for name in METRIC_NAMES)


def test_probe_model_restores_train_and_eval_mode(gpt2_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    batch = {"input_ids": torch.arange(2, 14).view(2, 6), "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    model.train()
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    report = probe_model(model, [batch])
    handle.remove()
    assert seen == [False]  # measured in eval mode (no dropout)
    assert model.training and all(m.training for m in model.modules())
    assert [row["tokens"] for row in report.rows] == [12, 12]
    model.eval()
    probe_model(model, [batch])
    assert not any(m.training for m in model.modules())


# ------------------------------------------------------------------------------------------ BERT
DOCUMENTS = [TEXT[:40], TEXT[40:100], "", TEXT[100:130], TEXT[130:600]]


def test_probe_bert_encoder_on_a_local_dataset(bert_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModel, AutoTokenizer

    data = tmp_path / "data"
    Dataset.from_dict({"id": list(range(len(DOCUMENTS))), "body": DOCUMENTS}).save_to_disk(data)
    out = tmp_path / "out"
    assert (
        main(
            [
                "probe",
                str(bert_dir),
                "--dataset",
                str(data),
                "--text-column",
                "body",
                "--seq-len",
                "12",
                "--batch-size",
                "4",
                "--max-tokens",
                "100",
                "--out",
                str(out),
                "--no-progress",
                "--no-flow",  # the rows and files without the flow stages
                "--no-plots",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["class"] == "BertModel"
    assert report["data"]["source"] == "dataset" and report["data"]["column"] == "body"

    # By hand: per document, [CLS] + up to 10 tokens + [SEP]; empty documents skipped; cut at 100 tokens.
    tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    sequences, total = [], 0
    for document in filter(None, DOCUMENTS):
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), 10):
            seq = ([2] + ids[i : i + 10] + [3])[: 100 - total]
            if len(seq) > 2:
                sequences.append(seq)
                total += len(seq)
    assert total == 100 and any(len(s) < 12 for s in sequences[:-4])  # pads inside the stream, not just at its end
    model = AutoModel.from_pretrained(bert_dir)
    expected = tracked_rows(model, sequences, batch_size=4, pad_id=0)  # [PAD] = 0
    assert [row["tokens"] for row in expected] == [100, 100]
    assert_rows_equal(report["rows"], expected)


# ------------------------------------------------------------------------------------------ timm
def test_probe_timm_mixer_checkpoint_on_embedded_digits(mixer_file, tmp_path):
    from sklearn.datasets import load_digits
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm.models.mlp_mixer import MlpMixer

    out = tmp_path / "out"
    kwargs = {k: v for k, v in MIXER_KWARGS.items() if k != "num_classes"}  # the head size is read off the weights
    assert (
        main(
            [
                "probe",
                str(mixer_file),
                "--timm-arch",
                "timm.models.mlp_mixer.MlpMixer",
                "--timm-kwargs",
                json.dumps(kwargs),
                "--num-images",
                "12",
                "--batch-size",
                "5",
                "--out",
                str(out),
                "--no-progress",
                "--no-flow",  # the rows and files without the flow stages
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == "embedded:digits" and report["data"]["images"] == 12
    assert report["model"]["timm_kwargs"]["num_classes"] == 5

    # By hand: digits scaled to [0, 1], resized to 32x32, 3 channels, ImageNet mean/std (Mixer's defaults).
    model = MlpMixer(**MIXER_KWARGS)
    model.load_state_dict(torch.load(mixer_file))
    model.train()  # probe_model must measure in eval mode and give the mode back
    x = torch.tensor(load_digits().images[:12], dtype=torch.float32).unsqueeze(1) / 16
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    model.eval()
    tracker = FFNTracker(model)
    with torch.no_grad(), tracker:
        for chunk in x.split(5):
            model(chunk)
    expected = tracker.compute().rows
    assert [r["site"] for r in expected] == ["token_mlp.0", "token_mlp.1", "channel_mlp.0", "channel_mlp.1"]
    # token MLPs see one row per (image, channel), channel MLPs one per (image, patch)
    assert [r["tokens"] for r in expected] == [12 * 24, 12 * 24, 12 * 16, 12 * 16]
    assert_rows_equal(report["rows"], expected)
    for name in ("metrics_per_layer.png", "js_per_layer.png", "spectra.png"):
        assert_png(out / name)


def test_probe_timm_mixer_on_an_image_dir(mixer_file, tmp_path):
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, where in enumerate(["a.png", "sub/b.jpg", "c.png"]):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(images / where)
    (images / "notes.txt").write_text("not an image")
    (images / "broken.png").write_bytes(b"not a png either")
    kwargs = {k: v for k, v in MIXER_KWARGS.items() if k != "num_classes"}
    out = tmp_path / "out"
    assert (
        main(
            [
                "probe",
                str(mixer_file),
                "--timm-arch",
                "timm.models.mlp_mixer.MlpMixer",
                "--timm-kwargs",
                json.dumps(kwargs),
                "--image-dir",
                str(images),
                "--out",
                str(out),
                "--no-progress",
                "--no-plots",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == "image-dir" and report["data"]["images"] == 3
    assert report["data"]["input_size"] == [3, 32, 32]
    assert [r["tokens"] for r in report["rows"]] == [3 * 24, 3 * 24, 3 * 16, 3 * 16]


# ------------------------------------------------------------------- Hub ids, from offline copies
def _register_tiny_timm_mixer() -> str:
    """A timm registry entry for a Mixer of any size (the real entries fix patch and embedding sizes)."""
    from timm.models import build_model_with_cfg, is_model, register_model
    from timm.models.mlp_mixer import MlpMixer

    name = "nerve_test_tiny_mixer"
    if not is_model(name):

        def nerve_test_tiny_mixer(pretrained=False, **kwargs):
            return build_model_with_cfg(MlpMixer, name, pretrained, **kwargs)

        register_model(nerve_test_tiny_mixer)
    return name


def test_probe_transformers_hub_id_offline_equals_its_local_folder(gpt2_dir, hub, tmp_path):
    hub.publish("tiny-org/tiny-gpt2", gpt2_dir)
    args = ["--max-tokens", "150", "--seq-len", "20", "--no-progress", "--no-plots"]
    assert main(["probe", "tiny-org/tiny-gpt2", "--out", str(tmp_path / "hub_out"), *args]) == 0
    assert main(["probe", str(gpt2_dir), "--out", str(tmp_path / "local_out"), *args]) == 0
    from_hub = json.loads((tmp_path / "hub_out" / "report.json").read_text())
    local = json.loads((tmp_path / "local_out" / "report.json").read_text())
    assert from_hub["model"]["location"] == "hub" and from_hub["model"]["path"] is None
    assert from_hub["model"]["class"] == "GPT2LMHeadModel" and from_hub["model"]["tokenizer"] == "tiny-org/tiny-gpt2"
    assert [r["tokens"] for r in from_hub["rows"]] == [150, 150]
    assert from_hub["rows"] == local["rows"]  # same weights, tokenizer and batches


def test_probe_transformers_hub_id_missing_offline(hub, tmp_path, capsys):
    assert main(["probe", "tiny-org/not-there", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr())
    assert "'tiny-org/not-there'" in line and "from the Hugging Face Hub" in line
    assert not (tmp_path / "o").exists()


def test_probe_timm_hub_model_offline(hub, tmp_path):
    import timm
    from timm.models import save_for_hf

    name = _register_tiny_timm_mixer()
    torch.manual_seed(3)
    model = timm.create_model(name, **MIXER_KWARGS)
    save_for_hf(model, tmp_path / "mixer_repo", model_args=MIXER_KWARGS, safe_serialization=True)
    hub.publish("timm/nerve-tiny-mixer", tmp_path / "mixer_repo")
    out = tmp_path / "out"
    assert (
        main(
            [
                "probe",
                "timm/nerve-tiny-mixer",
                "--num-images",
                "7",
                "--batch-size",
                "4",
                "--out",
                str(out),
                "--no-progress",
                "--no-plots",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["library"] == "timm" and report["model"]["location"] == "hub"
    assert report["model"]["architecture"] == name and report["model"]["input_size"] == [3, 32, 32]

    # The same weights, probed from a local checkpoint file, give the same numbers.
    torch.save(model.state_dict(), tmp_path / "mixer.pth")
    kwargs = {k: v for k, v in MIXER_KWARGS.items() if k != "num_classes"}
    local = tmp_path / "local"
    assert (
        main(
            [
                "probe",
                str(tmp_path / "mixer.pth"),
                "--timm-arch",
                "timm.models.mlp_mixer.MlpMixer",
                "--timm-kwargs",
                json.dumps(kwargs),
                "--num-images",
                "7",
                "--batch-size",
                "4",
                "--out",
                str(local),
                "--no-progress",
                "--no-plots",
            ]
        )
        == 0
    )
    assert report["rows"] == json.loads((local / "report.json").read_text())["rows"]
    assert [r["tokens"] for r in report["rows"]] == [7 * 24, 7 * 24, 7 * 16, 7 * 16]


def test_probe_on_a_hub_dataset_offline(gpt2_dir, hub, tmp_path):
    from hub_copies import c4_copy

    train, validation = [TEXT[:300], TEXT[300:900]], [TEXT[900:1500], TEXT[1500:1700]]
    hub.serve_dataset("allenai/c4", c4_copy(tmp_path / "c4", train, validation))
    args = ["--seq-len", "16", "--max-tokens", "120", "--no-progress", "--no-plots"]
    out = tmp_path / "out"
    assert (
        main(
            [
                "probe",
                str(gpt2_dir),
                "--dataset",
                "allenai/c4",
                "--dataset-config",
                "en",
                "--dataset-split",
                "validation",
                "--out",
                str(out),
                *args,
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"] == "dataset" and report["data"]["column"] == "text"

    # The streamed split gives what a local copy of the same documents gives.
    from datasets import Dataset

    Dataset.from_dict({"text": validation}).save_to_disk(tmp_path / "same_docs")
    same = tmp_path / "same"
    assert main(["probe", str(gpt2_dir), "--dataset", str(tmp_path / "same_docs"), "--out", str(same), *args]) == 0
    assert report["rows"] == json.loads((same / "report.json").read_text())["rows"]
    assert [r["tokens"] for r in report["rows"]] == [120, 120]


# ------------------------------------------------------------------------------------- bad input
def test_image_model_given_text(mixer_file, text_file, tmp_path, capsys):
    assert (
        main(
            [
                "probe",
                str(mixer_file),
                "--timm-arch",
                "mixer_s16_224",
                "--text-file",
                str(text_file),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "image model" in one_error_line(capsys.readouterr())
    assert not (tmp_path / "o").exists()


def test_empty_text_file_keeps_earlier_outputs(gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"rows": ["earlier"]}')
    (out / "notes.txt").write_text("mine")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    assert main(["probe", str(gpt2_dir), "--text-file", str(empty), "--out", str(out)]) == 2
    assert "empty" in one_error_line(capsys.readouterr())
    assert (out / "report.json").read_text() == '{"rows": ["earlier"]}'
    assert (out / "notes.txt").read_text() == "mine"


def test_unsupported_architecture(tmp_path, capsys):
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    assert main(["probe", str(path), "--timm-arch", "test_resnet", "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys.readouterr())
    assert "unsupported architecture" in line and "ResNet" in line


def test_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    assert main(["probe", str(tmp_path / "stuff")]) == 2
    assert "config.json" in one_error_line(capsys.readouterr())


def test_cli_subprocess_path_that_is_neither_model_nor_hub_id(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nerve_hf.cli",
            "probe",
            str(tmp_path / "no" / "such" / "model"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "neither a local model folder nor a Hugging Face Hub id" in lines[0], result.stderr
    assert result.stdout == "" and not (tmp_path / "o").exists()
