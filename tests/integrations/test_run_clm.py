"""scripts/run_clm.py and scripts/demo.py, run in-process on tiny models and local files (nothing downloaded)."""

import importlib.util
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from nerve_hf.data import load_stdlib_corpus, tokenize_and_group, train_bpe_tokenizer
from nerve_hf.integrations.callback import NerveConfig

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

TINY = "n_layer=2,n_embd=32,n_head=2,n_inner=37,n_positions=64"  # odd FFN width, as DESIGN §5 asks
BLOCK = 32


def load_script(name):
    if str(SCRIPTS) not in sys.path:  # as `python scripts/<name>.py` has it: demo.py imports run_clm
        sys.path.append(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"nerve_test_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_clm():
    return load_script("run_clm")


@pytest.fixture(scope="module")
def demo():
    return load_script("demo")


@pytest.fixture(scope="module")
def texts():
    return list(load_stdlib_corpus(max_bytes=120_000)["train"]["text"])


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, texts):
    """A 400-token BPE saved like any local tokenizer, passed as --tokenizer_name."""
    path = tmp_path_factory.mktemp("tok")
    train_bpe_tokenizer(texts, vocab_size=400).save_pretrained(str(path))
    return path


def common_args(tmp_path, tokenizer_dir):
    return [
        "--output_dir",
        str(tmp_path / "out"),
        "--tokenizer_name",
        str(tokenizer_dir),
        "--config_overrides",
        TINY,
        "--block_size",
        str(BLOCK),
        "--per_device_train_batch_size",
        "4",
        "--per_device_eval_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--cache_dir",
        str(tmp_path / "hf_cache"),
        "--dataloader_pin_memory",
        "false",
        "--disable_tqdm",
        "true",
    ]


def test_from_scratch_on_jsonl(run_clm, tokenizer_dir, texts, tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    argv = common_args(tmp_path, tokenizer_dir) + [
        "--train_file",
        str(train_file),
        "--validation_split_percentage",
        "20",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "3",
        "--max_eval_samples",
        "16",
    ]
    metrics = run_clm.main(argv)

    out = tmp_path / "out"
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]
    config = json.loads((out / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_inner"], config["vocab_size"]) == (2, 32, 37, 400)
    assert metrics["eval_samples"] == 16
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert 50 < metrics["eval_perplexity"] < 1000  # near-random tiny model over a 400-token vocabulary
    assert metrics["perplexity"] == metrics["eval_perplexity"]  # upstream's key, and ours
    assert 0 <= metrics["eval_accuracy"] <= 1  # token accuracy through evaluate, as upstream
    saved = json.loads((out / "all_results.json").read_text())
    assert saved["eval_perplexity"] == pytest.approx(metrics["eval_perplexity"])
    assert saved["perplexity"] == pytest.approx(metrics["perplexity"])
    assert saved["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    assert "generated_from_trainer" in (out / "README.md").read_text()  # the model card, written offline


def test_from_scratch_on_txt_with_validation_file(run_clm, tokenizer_dir, texts, tmp_path):
    from transformers import AutoTokenizer

    train_file, validation_file = tmp_path / "train.txt", tmp_path / "valid.txt"
    train_file.write_text("".join(texts[1:]))
    validation_file.write_text(texts[0])
    argv = common_args(tmp_path, tokenizer_dir) + [
        "--train_file",
        str(train_file),
        "--validation_file",
        str(validation_file),
        "--do_train",
        "--do_eval",
        "--max_steps",
        "3",
        "--save_strategy",
        "no",
    ]
    metrics = run_clm.main(argv)

    # every line of the validation file is a row; the eval set is all its blocks
    import datasets

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = texts[0].splitlines(keepends=True)
    expected = tokenize_and_group(datasets.Dataset.from_dict({"text": lines}), tok, BLOCK)
    assert metrics["eval_samples"] == expected.num_rows > 0
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 3
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_json_config_file_and_eval_only(run_clm, tokenizer_dir, texts, tmp_path):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # HfArgumentParser reads a single .json argument as the dataclass fields, with JSON types
    config = {
        "output_dir": str(tmp_path / "out"),
        "tokenizer_name": str(tokenizer_dir),
        "config_overrides": TINY,
        "block_size": BLOCK,
        "train_file": str(train_file),
        "do_eval": True,
        "max_eval_samples": 8,
        "per_device_eval_batch_size": 8,
        "report_to": "none",
        "cache_dir": str(tmp_path / "hf_cache"),
        "dataloader_pin_memory": False,
    }
    config_file = tmp_path / "args.json"
    config_file.write_text(json.dumps(config))

    metrics = run_clm.main([str(config_file)])
    assert "train_loss" not in metrics and metrics["eval_samples"] == 8
    # an untrained model predicts close to uniformly: loss near ln(vocab)
    assert abs(metrics["eval_loss"] - math.log(400)) < 0.5


def test_streaming_embedded_corpus(run_clm, tokenizer_dir, tmp_path):
    argv = common_args(tmp_path, tokenizer_dir) + [
        "--dataset_name",
        "stdlib-code",
        "--embedded_max_bytes",
        "100000",
        "--streaming",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "2",
        "--max_eval_samples",
        "4",
        "--save_strategy",
        "no",
    ]
    metrics = run_clm.main(argv)
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["global_step"] == 2
    assert math.isfinite(metrics["eval_loss"]) and "eval_samples" not in metrics


def test_argument_validation(run_clm):
    args = run_clm.NerveArguments(nerve_layers=[0, 2, 5])
    assert args.config().layers == [0, 2, 5]
    assert run_clm.NerveArguments().config().layers is None
    with pytest.raises(ValueError, match="--nerve_layers must be None or a non-empty list of integers"):
        run_clm.NerveArguments(nerve_layers="0,x")
    with pytest.raises(ValueError, match="nerve_every_n_steps"):
        run_clm.NerveArguments(nerve_every_n_steps=0)
    with pytest.raises(ValueError, match="config_overrides"):
        run_clm.ModelArguments(model_name_or_path="some/model", config_overrides="n_layer=2")
    with pytest.raises(ValueError, match="streaming"):
        run_clm.DataTrainingArguments(train_file="a.txt", streaming=True)


def test_nerve_arguments_reach_the_callback(run_clm, tokenizer_dir, texts, tmp_path, monkeypatch):
    """The wiring alone, with a stand-in callback module (the real one is tested below and in test_callback)."""
    import types

    from transformers import TrainerCallback

    made = []

    class RecordingCallback(TrainerCallback):
        def __init__(self, **kwargs):
            self.kwargs, self.steps = kwargs, []
            made.append(self)

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    monkeypatch.setitem(
        sys.modules, "nerve_hf.integrations.callback", types.SimpleNamespace(NerveCallback=RecordingCallback)
    )
    train_file = tmp_path / "train.txt"
    train_file.write_text("".join(texts))
    base = common_args(tmp_path, tokenizer_dir) + ["--train_file", str(train_file), "--do_train", "--max_steps", "2"]
    run_clm.main(base + ["--save_strategy", "no"])
    assert made == []  # no --nerve: no callback is made
    run_clm.main(
        base
        + [
            "--save_strategy",
            "no",
            "--nerve",
            "--nerve_every_n_steps",
            "7",
            "--nerve_layers",
            "0",
            "1",
            "--nerve_max_tokens",
            "64",
            "--nerve_measure_eval",
            "false",
        ]
    )
    assert len(made) == 1 and made[0].steps == [1, 2]
    expected = dict(every_n_steps=7, layers=[0, 1], max_tokens=64, measure_train=True, measure_eval=False)
    assert {name: made[0].kwargs[name] for name in expected} == expected
    assert made[0].kwargs == asdict(NerveConfig(**expected))  # every other option at its default


def test_nerve_flag_runs_the_callback(run_clm, tokenizer_dir, texts, tmp_path, capsys):
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    argv = common_args(tmp_path, tokenizer_dir) + [
        "--train_file",
        str(train_file),
        "--do_train",
        "--do_eval",
        "--max_steps",
        "4",
        "--max_eval_samples",
        "8",
        "--save_strategy",
        "no",
        "--nerve",
        "--nerve_every_n_steps",
        "2",
        "--nerve_layers",
        "1",
    ]
    run_clm.main(argv)
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "nerve_metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert sorted({r["step"] for r in train}) == [2, 4]
    assert {r["layer"] for r in records} == {1}
    assert any(r["split"] != "train" for r in records)  # the final evaluation was measured too
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "nerve/mean/se_pre" in h] == [2, 4]
    assert [h["step"] for h in history if "nerve/ffn.1/se_pre" in h] == [2, 4]
    assert "eval_nerve/ffn.1/js" in json.loads((out / "eval_results.json").read_text())
    # The console shows the layer means only; single FFNs are in the files above.
    console = capsys.readouterr().out
    assert console.count("'nerve/mean/se_pre'") == 2 and "eval_nerve/mean/js" in console
    assert "nerve/ffn." not in console


def upstream_accuracy(preds, labels):
    """Upstream run_clm's token accuracy, computed directly: shift by one, (preds == labels).mean()."""
    preds, labels = preds[:, :-1].reshape(-1), labels[:, 1:].reshape(-1)
    keep = labels != -100
    return float((preds[keep] == labels[keep]).mean())


def test_token_accuracy_through_evaluate_matches_direct_computation(run_clm):
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=(6, 11))  # few classes: many predictions are right
    preds = np.where(rng.random(labels.shape) < 0.5, np.roll(labels, -1, axis=1), rng.integers(0, 5, labels.shape))
    labels[0, 3:7] = -100  # ignored positions never count
    compute_metrics = run_clm.token_accuracy_metrics()
    result = compute_metrics((preds, labels))
    assert set(result) == {"accuracy"}
    assert result["accuracy"] == pytest.approx(upstream_accuracy(preds, labels), abs=1e-12)
    assert 0.3 < result["accuracy"] < 0.9

    # the metric module alone: what the Hub's `accuracy` (sklearn's accuracy_score) gives
    import evaluate

    metric = evaluate.load(str(run_clm.ACCURACY_METRIC))
    assert metric.compute(predictions=[0, 1, 1, 2, 1, 0], references=[0, 1, 2, 0, 1, 2]) == {"accuracy": 0.5}
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 2], normalize=False) == {"accuracy": 2.0}
    weighted = metric.compute(predictions=[0, 1, 1], references=[0, 1, 2], sample_weight=[1, 1, 2])
    assert weighted["accuracy"] == pytest.approx(0.5)

    logits = torch.randn(2, 4, 7)
    assert torch.equal(run_clm.preprocess_logits_for_metrics((logits, None), None), logits.argmax(-1))


def test_upstream_flags(run_clm, tokenizer_dir, monkeypatch):
    import datasets
    import transformers

    model_args, data_args, training_args, _ = run_clm.parse_args(
        ["--output_dir", "x", "--use_fast_tokenizer", "false", "--overwrite_cache", "--low_cpu_mem_usage"]
        + ["--push_to_hub", "--tokenizer_name", str(tokenizer_dir)]
    )
    assert (model_args.use_fast_tokenizer, data_args.overwrite_cache, model_args.low_cpu_mem_usage) == (
        False,
        True,
        True,
    )
    assert training_args.push_to_hub  # passed to the Trainer as TrainingArguments; never pushed in tests

    seen = {}
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", lambda source, **kwargs: seen.update(kwargs) or "tok"
    )
    assert run_clm.load_tokenizer(model_args, data_args) == "tok" and seen["use_fast"] is False

    major = int(transformers.__version__.split(".")[0])
    assert run_clm.low_cpu_mem_usage_kwargs(model_args) == ({} if major >= 5 else {"low_cpu_mem_usage": True})
    assert run_clm.low_cpu_mem_usage_kwargs(run_clm.ModelArguments()) == {}

    assert datasets.is_caching_enabled()
    with run_clm.cache_reuse(True):  # --overwrite_cache: Dataset.map recomputes instead of loading its cache
        assert not datasets.is_caching_enabled()
    assert datasets.is_caching_enabled()
    with run_clm.cache_reuse(False):
        assert datasets.is_caching_enabled()


def test_console_view_keeps_layer_means(run_clm):
    logs = {
        "loss": 2.5,
        "nerve/ffn.0/js": 0.1,
        "nerve/mean/js": 0.2,
        "eval_nerve/token_mlp.1/se_pre": 3.0,
        "eval_nerve/mean/se_pre": 3.1,
        "test_nerve/ffn.2/pr_pre": 4.0,
        "nerve_note": "kept",
    }
    assert run_clm.console_view(logs) == {
        "loss": 2.5,
        "nerve/mean/js": 0.2,
        "eval_nerve/mean/se_pre": 3.1,
        "nerve_note": "kept",
    }


def test_hub_model_and_hub_dataset_offline(run_clm, tokenizer_dir, texts, tmp_path, hub):
    """The README's network command (a Hub model fine-tuned on streamed codeparrot with --nerve), run on
    local copies in the Hub's layout: the model from an offline Hub cache, the dataset's files at the Hub's
    paths (tests/hub_copies.py)."""
    import torch
    from hub_copies import codeparrot_copy
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_head=2, n_layer=2, n_inner=37)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "repo")
    tokenizer.save_pretrained(tmp_path / "repo")
    hub.publish("tiny-org/tiny-gpt2", tmp_path / "repo")
    hub.serve_dataset("codeparrot/codeparrot-clean", codeparrot_copy(tmp_path / "codeparrot", texts[:30]))

    out = tmp_path / "out"
    metrics = run_clm.main(
        [
            "--model_name_or_path",
            "tiny-org/tiny-gpt2",
            "--dataset_name",
            "codeparrot/codeparrot-clean",
            "--streaming",
            "--streaming_validation_docs",
            "3",
            "--block_size",
            str(BLOCK),
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "4",
            "--per_device_eval_batch_size",
            "4",
            "--max_steps",
            "2",
            "--max_eval_samples",
            "4",
            "--do_train",
            "--do_eval",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--dataloader_pin_memory",
            "false",
            "--disable_tqdm",
            "true",
            "--nerve",
            "--nerve_every_n_steps",
            "2",
        ]
    )
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert math.isfinite(metrics["eval_loss"])
    records = [json.loads(line) for line in (out / "nerve_metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [(r["step"], r["site"], r["tokens"]) for r in train] == [(2, "ffn.0", 4 * BLOCK), (2, "ffn.1", 4 * BLOCK)]
    assert all(r["pr_post"] is not None and r["pr_post"] > 1 for r in records)


# --- demo ---------------------------------------------------------------------------------------------


def test_summary_reader_keeps_last_measurement(demo, tmp_path):
    path = tmp_path / "nerve_metrics.jsonl"
    rows = [
        {"step": 10, "split": "train", "site": "h.0.mlp", "layer": 0, "tokens": 64, "se_pre": 1.0, "js": 0.1},
        {"step": 20, "split": "train", "site": "h.0.mlp", "layer": 0, "tokens": 64, "se_pre": 2.0, "js": 0.2},
        {"step": 20, "split": "train", "site": "h.1.mlp", "layer": 1, "tokens": 64, "se_pre": float("nan")},
        {"step": 20, "split": "eval", "site": "h.0.mlp", "layer": 0, "tokens": 32, "se_pre": 3.0},
    ]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"truncated": ')  # a partly written line must not break the summary
    path.write_text("\n".join(lines) + "\n")
    latest = demo.last_measurements(path)
    assert set(latest) == {("train", "h.0.mlp"), ("train", "h.1.mlp"), ("eval", "h.0.mlp")}
    assert latest[("train", "h.0.mlp")]["se_pre"] == 2.0
    table = demo.summary_table(latest)
    assert "[eval]" in table and "[train]" in table
    assert table.index("[train]") < table.index("[eval]")
    train_rows = table.split("[train]")[1].split("[eval]")[0].strip().splitlines()[2:]
    assert train_rows[0].split()[:5] == ["0", "h.0.mlp", "20", "64", "2.000"]
    assert train_rows[1].split()[4] == "nan"
    assert train_rows[2].split()[:2] == ["mean", "nan"]  # a NaN layer is not averaged away
    assert train_rows[2].split()[-1] == "0.200"  # js: only layer 0 has it
    assert demo.summary_table({}) == "no NerVE measurements found"
    assert demo.last_measurements(tmp_path / "missing.jsonl") == {}


def test_demo_refuses_a_foreign_directory(demo, tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not made by this demo"):
        demo.main(["--output-dir", str(tmp_path), "--quick"])
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.fixture
def demo_cache(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "demo_nerve_cache"  # shared: the quick tokenizer trains once
    monkeypatch.setenv("NERVE_HF_CACHE", str(cache))
    return cache


def check_demo_run(out: Path, metrics: dict, steps: int):
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    evals = [h for h in state["log_history"] if "eval_loss" in h]
    fifth = steps // 5
    assert [h["step"] for h in evals] == [fifth * k for k in range(1, 6)]  # every 20%; the last is the final eval
    assert metrics["eval_loss"] == evals[-1]["eval_loss"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{4 * fifth}", f"checkpoint-{steps}"]
    assert list(out.glob("runs/*/events.out.tfevents.*")), "no TensorBoard event file"
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))


def test_demo_quick_without_nerve(demo, demo_cache, tmp_path, capsys):
    out = tmp_path / "demo"
    metrics = demo.main(["--quick", "--no-nerve", "--max-steps", "15", "--output-dir", str(out)])
    check_demo_run(out, metrics, steps=15)
    printed = capsys.readouterr().out
    assert "no NerVE measurements found" in printed and "final eval loss" in printed
    # a rerun replaces its own earlier run
    demo.main(["--quick", "--no-nerve", "--max-steps", "2", "--output-dir", str(out)])
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_demo_quick_with_nerve(demo, demo_cache, tmp_path, capsys):
    out = tmp_path / "demo"
    metrics = demo.main(["--quick", "--output-dir", str(out)])
    check_demo_run(out, metrics, steps=40)
    latest = demo.last_measurements(out / "nerve_metrics.jsonl")
    splits = {split for split, _ in latest}
    assert "train" in splits and len(splits) == 2
    assert {r["layer"] for r in latest.values()} == {0, 1}
    assert all(r["step"] == 40 for (split, _), r in latest.items() if split == "train")
    printed = capsys.readouterr().out
    assert "[train] last measurement per FFN" in printed


def test_eval_loss_is_the_mean_next_token_loss_the_probe_reports(run_clm, tokenizer_dir, texts, tmp_path):
    """eval_loss and perplexity are the mean next-token cross-entropy over the B(T-1) predicted tokens (issue #29:
    GPT2LMHeadModel's unnamed loss made the Trainer divide by B*T, i.e. (T-1)/T of it), as the probe reports it."""
    import torch

    from nerve_hf.probe.measure import TokenLoss

    train_file = tmp_path / "train.jsonl"
    train_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    argv = common_args(tmp_path, tokenizer_dir) + [
        "--train_file",
        str(train_file),
        "--validation_split_percentage",
        "10",
        "--do_train",
        "--do_eval",
        "--max_steps",
        "2",
        "--max_eval_samples",
        "11",
    ]
    metrics = run_clm.main(argv)
    model_args, data_args, training_args, _ = run_clm.parse_args(argv)
    tokenizer = run_clm.load_tokenizer(model_args, data_args)
    _, blocks = run_clm.prepare_datasets(data_args, model_args, tokenizer, BLOCK, training_args)
    ids = torch.tensor(blocks["input_ids"])  # [11, BLOCK]: the evaluation blocks
    assert ids.shape == (11, BLOCK) and metrics["eval_samples"] == 11
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert model.loss_type is None  # the name is not saved: run_clm gives it to the model it trains
    probe = TokenLoss()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()  # [11, BLOCK, V]
        probe({"input_ids": ids}, model(input_ids=ids))
    # reference: float64 log-softmax, position t predicting token t+1, averaged over 11 * (BLOCK - 1) tokens
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    want = float(-logp.gather(-1, ids[:, 1:, None]).mean())
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)  # not want * (BLOCK - 1) / BLOCK
    assert probe.mean == pytest.approx(want, rel=1e-9)
    assert metrics["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_run_clm_names_the_causal_lm_loss(run_clm):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11))
    assert model.loss_type is None  # transformers: "loss_type=None ... unrecognized" and the (T-1)/T count
    run_clm.name_causal_lm_loss(model)
    assert model.loss_type == "ForCausalLM"


def test_help_lists_the_nerve_flags_first(run_clm):
    """issue #29: --help shows the --nerve* group right after a short usage; --no_nerve_<flag> says what it does."""
    text = run_clm.build_parser().format_help()
    lines = text.splitlines()
    group = lines.index("NerVE (nerve_hf.NerveCallback; every NerveConfig option):")
    assert group < 5 and lines[group + 1].lstrip().startswith("--nerve ")
    assert text.index("--nerve_metrics") < text.index("--model_name_or_path") < text.index("--output_dir")
    negative = text[text.index("--no_nerve_flow, --no-nerve-flow") :].split("\n  --")[0]
    assert "turn --nerve_flow off; it is on by default" in " ".join(negative.split())
    model_args, data_args, training_args, nerve_args = run_clm.parse_args(
        ["--output_dir", "x", "--nerve", "--no_nerve_flow", "--block_size", "16"]
    )
    assert nerve_args.nerve and nerve_args.config().flow is False and data_args.block_size == 16
    assert training_args.output_dir == "x" and model_args.model_name_or_path is None
