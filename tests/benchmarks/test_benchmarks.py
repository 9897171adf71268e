"""benchmarks/: experiment configs, the smoke preset end to end, the paper preset on meta, tables.py.

Everything runs offline on tiny models: the smoke preset trains each zoo variant for two steps and one
experiment for three steps with three evaluations.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _experiments  # noqa: E402
import _settings  # noqa: E402

RESULT_KEYS = {
    "schema_version",
    "experiment",
    "preset",
    "task",
    "section",
    "description",
    "labels",
    "command",
    "created",
    "environment",
    "runs",
}
RUN_KEYS = {"variant", "optimizer", "final", "history", "nerve", "correlations", "provenance", "settings"}
PROVENANCE_KEYS = {"dataset", "steps", "seed", "wall_time_s", "cpu_time_s", "parameters"}
from nerve_hf.metrics import METRIC_NAMES as METRICS  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def offline_cache_and_one_thread(tmp_path_factory):
    """Tokenizers trained into a temporary cache; one torch thread (tiny models, shared CI cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NERVE_HF_CACHE", str(tmp_path_factory.mktemp("nerve_cache")))
        patch.setenv("HF_HUB_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- configs
def test_experiments_are_the_issue_list_and_resolve_for_every_preset():
    names = _experiments.list_experiments()
    assert names == sorted(
        [
            "gpt2_activations",
            "gpt2_normfree",
            "gpt2_weightnorm",
            "gpt2_norm_position",
            "gpt2_width",
            "llama_positional",
            "optimizers",
            "mixer",
            "moe",  # issue 27: the experiment beyond the paper
        ]
    )
    for name in names:
        experiment = _experiments.load_experiment(name)
        for preset in _settings.PRESET_NAMES:
            runs = experiment.runs_for(preset)
            assert runs, (name, preset)
            for run in runs:
                settings = experiment.resolve(run, preset)
                assert settings.task == experiment.task and settings.variant == run.variant


def test_smoke_experiments_cover_every_zoo_variant():
    from nerve_zoo import VARIANTS

    covered = {
        run.variant
        for name in _experiments.list_experiments()
        for run in _experiments.load_experiment(name).runs_for("smoke")
    }
    assert covered == set(VARIANTS)


def test_settings_resolution_order():
    experiment = _experiments.load_experiment("optimizers")
    run = next(r for r in experiment.runs if r.name == "muon-long")
    cpu = experiment.resolve(run, "cpu")
    assert (cpu.optimizer, cpu.block_size, cpu.batch_size) == ("muon", 128, 8)
    assert cpu.model_overrides == {"n_embd": 64, "n_layer": 4, "n_head": 4, "n_positions": 128}  # shape, then run
    paper = experiment.resolve(run, "paper")
    assert (paper.size, paper.block_size, paper.dataset) == ("160m", 1024, "HuggingFaceFW/fineweb")
    with pytest.raises(ValueError, match="unknown run settings"):
        _settings.resolve("cpu", "lm", {"learning_rat": 1.0})


# --------------------------------------------------------------------------- paper preset, no training
PAPER_COUNTS = [  # (experiment, run, parameters on meta, relative tolerance)
    ("gpt2_activations", "gelu", 124_439_808, 0.0),  # GPT-2 small, "125M"
    ("gpt2_width", "width-8x", 181.1e6, 0.001),
    ("optimizers", "adamw-short", 163.0e6, 0.001),  # GPT-2 160M (untied head)
    ("optimizers", "muon-350m-long", 354.8e6, 0.001),
    ("llama_positional", "rope-71m", 70.6e6, 0.001),
    ("llama_positional", "nope-1.3b", 1339.1e6, 0.001),
    ("mixer", "sgd-gelu-gelu", 59.2e6, 0.001),  # Mixer-B/16, CIFAR-100
]


@pytest.mark.parametrize("experiment, run, count, tolerance", PAPER_COUNTS)
def test_paper_preset_builds_the_paper_sizes_on_meta(experiment, run, count, tolerance):
    import run as bench_run

    exp = _experiments.load_experiment(experiment)
    settings = exp.resolve(next(r for r in exp.runs if r.name == run), "paper")
    assert bench_run.parameter_count(settings) == pytest.approx(count, rel=tolerance)


def test_paper_lm_data_loads_the_hub_tokenizer_and_streamed_dataset_offline(tmp_path, hub):
    """The paper preset's data path (tokenizer ``gpt2``, streamed ``codeparrot/codeparrot-clean``) on local
    copies in the Hub's layout (tests/hub_copies.py): the first 1000 documents are held out for evaluation."""
    import _data
    from hub_copies import codeparrot_copy
    from transformers import GPT2Config

    from nerve_hf.data import train_bpe_tokenizer

    documents = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(1012)]
    tokenizer = train_bpe_tokenizer(documents[:50], vocab_size=300)
    tokenizer.save_pretrained(str(tmp_path / "gpt2"))
    GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=24, n_head=3).save_pretrained(
        tmp_path / "gpt2"
    )  # as on the Hub
    hub.publish("gpt2", tmp_path / "gpt2")
    hub.serve_dataset("codeparrot/codeparrot-clean", codeparrot_copy(tmp_path / "codeparrot", documents))
    settings = _settings.resolve("paper", "lm", {"block_size": 16, "eval_samples": 3})
    train, validation, vocab, info = _data.lm_data(settings)
    assert vocab == len(tokenizer) and info["tokenizer"] == "gpt2" and info["eval_blocks"] == 3

    def blocks(docs):  # documents joined with eos, cut into 16-token blocks
        ids = [t for doc in docs for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]
        return [ids[i : i + 16] for i in range(0, len(ids) - 15, 16)]

    assert [row["input_ids"] for row in validation] == blocks(documents[:1000])[:3]
    assert [row["input_ids"] for row in train] == blocks(documents[1000:])


def test_paper_dry_run_prints_the_plan_without_training(capsys, tmp_path):
    import run as bench_run

    bench_run.main(["gpt2_activations", "optimizers", "--preset", "paper", "--dry-run", "--out", str(tmp_path)])
    plan = capsys.readouterr().out
    assert "codeparrot/codeparrot-clean ctx 128" in plan and "batch=32x4 41000 steps" in plan
    assert "HuggingFaceFW/fineweb ctx 1024" in plan and "124.44M" in plan
    assert not any(tmp_path.iterdir())  # nothing trained, nothing written


# --------------------------------------------------------------------------- smoke: every variant trains
def _variant_settings():
    from nerve_zoo import VARIANTS

    for name, variant in VARIANTS.items():
        task = "image" if variant.family == "mixer" else "lm"
        yield (
            name,
            _settings.resolve("smoke", task, {"variant": name, "max_steps": 2, "eval_every": 2, "eval_samples": 4}),
        )


@pytest.mark.parametrize("variant, settings", list(_variant_settings()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_variant_trains_two_steps_in_the_smoke_preset(variant, settings):
    from _train import train_run

    entry = train_run(settings, progress=False)
    assert entry["provenance"]["steps"] == 2
    assert math.isfinite(entry["final"]["eval_loss"])
    nerve = entry["nerve"]
    assert nerve["steps"] == [2] and len(nerve["sites"]) == (4 if settings.task == "image" else 2)
    for metric in METRICS:
        assert all(v is not None and math.isfinite(v) for v in nerve["per_site"][metric][0]), metric


# --------------------------------------------------------------------------- smoke: one experiment end to end
@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    import run as bench_run

    out = tmp_path_factory.mktemp("results")
    bench_run.main(["gpt2_activations", "--preset", "smoke", "--runs", "gelu", "--out", str(out), "--quiet"])
    return out


def _finite_numbers(value):
    if isinstance(value, float):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _finite_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _finite_numbers(item)


def test_smoke_experiment_writes_one_result_file_with_the_documented_keys(smoke_results):
    files = list((smoke_results / "smoke").glob("*.json"))
    assert [f.name for f in files] == ["gpt2_activations.json"]
    result = json.loads(files[0].read_text())
    assert RESULT_KEYS <= set(result) and result["preset"] == "smoke"
    assert list(result["runs"]) == ["gelu"]
    entry = result["runs"]["gelu"]
    assert RUN_KEYS <= set(entry) and PROVENANCE_KEYS <= set(entry["provenance"])
    assert 0 < entry["provenance"]["cpu_time_s"] < 50 * entry["provenance"]["wall_time_s"]  # threads run in parallel
    assert entry["final"]["perplexity"] == pytest.approx(math.exp(entry["final"]["eval_loss"]), rel=1e-5)
    assert entry["history"]["step"] == entry["nerve"]["steps"] == [1, 2, 3]
    assert entry["nerve"]["sites"] == ["ffn.0", "ffn.1"]
    assert all(math.isfinite(x) for x in _finite_numbers(entry["nerve"])) and math.isfinite(entry["final"]["eval_loss"])


def test_stored_r_equals_scipy_on_the_stored_pairs(smoke_results):
    from scipy.stats import pearsonr

    entry = json.loads((smoke_results / "smoke" / "gpt2_activations.json").read_text())["runs"]["gelu"]
    loss = dict(zip(entry["history"]["step"], entry["history"]["eval_loss"]))
    y = [loss[s] for s in entry["nerve"]["steps"]]
    for metric in METRICS:
        x = entry["nerve"]["mean"]["all"][metric]
        stored = entry["correlations"]["mean"]["all"][metric]
        assert stored["n"] == 3
        assert stored["r"] == pytest.approx(pearsonr(x, y).statistic, abs=2e-4), metric  # stored values are rounded
        per_site = [[row[k] for row in entry["nerve"]["per_site"][metric]] for k in range(2)]
        for k, xs in enumerate(per_site):
            assert entry["correlations"]["per_site"][metric][k] == pytest.approx(pearsonr(xs, y).statistic, abs=2e-4)


def test_pearson_helper_refuses_too_few_or_constant_pairs():
    from _stats import pearson

    assert pearson([1.0, 2.0], [3.0, 4.0])["r"] is None
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["r"] is None
    assert pearson([1.0, None, 2.0, 3.0], [2.0, 5.0, 4.0, 6.0])["n"] == 3


def test_tables_render_markdown_from_a_result_file(smoke_results):
    import tables

    output = tables.main(["--results", str(smoke_results), "--preset", "smoke", "--no-figures"])
    text = output.read_text()
    assert "## gpt2_activations" in text and "| GELU |" in text
    assert "2.714" in text  # the paper's GELU perplexity beside ours
    assert "-0.992" in text  # the paper's within-run r(SE_pre)
    assert "Verdict:" in text


def test_tables_default_to_every_preset_with_results_in_preset_order(smoke_results, tmp_path):
    import shutil

    import tables

    for preset in ("cpu-long", "cpu"):  # made in the other order: the README follows _settings.PRESETS
        shutil.copytree(smoke_results / "smoke", tmp_path / preset)
    (tmp_path / "paper").mkdir()  # a preset folder without result files is left out
    shutil.copytree(smoke_results / "smoke", tmp_path / "smoke")  # and smoke unless named
    text = tables.main(["--results", str(tmp_path), "--no-figures"]).read_text()
    assert text.splitlines()[0] == "# NerVE model-zoo results (`cpu`, `cpu-long` presets)"
    assert text.index("## `cpu` preset") < text.index("## `cpu-long` preset")
    with pytest.raises(SystemExit):
        tables.main(["--results", str(tmp_path / "paper"), "--no-figures"])


def test_tables_make_png_figures(smoke_results, tmp_path):
    import tables

    results = tables.load_results(smoke_results, "smoke")
    figures = tables.make_figures(results, tmp_path)
    assert figures and all(path.suffix == ".png" and path.stat().st_size > 1000 for path in figures)


def test_resume_keeps_finished_runs_and_trains_nothing_more(smoke_results, tmp_path):
    import shutil

    import run as bench_run

    shutil.copytree(smoke_results / "smoke", tmp_path / "smoke")
    before = (tmp_path / "smoke" / "gpt2_activations.json").read_text()
    path = bench_run.run_experiment("gpt2_activations", "smoke", tmp_path, runs=["gelu"], resume=True, progress=False)
    assert path.read_text() == before  # gelu was there: nothing ran, nothing rewritten


def test_resume_completes_a_file_only_with_its_settings_and_another_seed_is_a_replicate(smoke_results, tmp_path):
    import shutil

    import run as bench_run
    from _results import replicate_seed

    shutil.copytree(smoke_results / "smoke", tmp_path / "smoke")
    main_file = tmp_path / "smoke" / "gpt2_activations.json"
    before = main_file.read_text()
    recorded = json.loads(before)["runs"]["gelu"]["settings"]["learning_rate"]
    with pytest.raises(SystemExit, match=rf"run gelu .*\(learning_rate: recorded {recorded}, asked 0\.5\)"):
        bench_run.run_experiment(
            "gpt2_activations", "smoke", tmp_path, resume=True, progress=False, overrides={"learning_rate": 0.5}
        )
    path = bench_run.run_experiment(
        "gpt2_activations", "smoke", tmp_path, runs=["gelu"], resume=True, progress=False, overrides={"seed": 3}
    )
    assert path == tmp_path / "smoke" / "seeds" / "gpt2_activations.seed3.json"
    replicate = json.loads(path.read_text())
    assert replicate_seed(replicate) == 3 and list(replicate["runs"]) == ["gelu"]
    assert main_file.read_text() == before  # the seed-0 file is untouched
    ours = replicate["runs"]["gelu"]["final"]["eval_loss"]
    assert ours != json.loads(before)["runs"]["gelu"]["final"]["eval_loss"]  # another init: another model


def test_fingerprint_results_adds_the_fingerprint_only_when_every_run_matches_its_data(smoke_results, tmp_path):
    import fingerprint_results

    path = tmp_path / "smoke" / "gpt2_activations.json"
    path.parent.mkdir()
    recorded = json.loads((smoke_results / "smoke" / "gpt2_activations.json").read_text())
    (want,) = recorded["corpora"].values()
    old = json.loads(json.dumps(recorded))  # as written before fingerprints existed
    del old["corpora"]
    del old["runs"]["gelu"]["provenance"]["corpus_id"]

    old["runs"]["gelu"]["provenance"]["train_blocks"] += 1  # a run whose data the settings no longer make
    path.write_text(json.dumps(old))
    assert "does not match its data (train_blocks" in fingerprint_results.add_fingerprints(path)
    assert "corpora" not in json.loads(path.read_text())

    old["runs"]["gelu"]["provenance"]["train_blocks"] -= 1
    path.write_text(json.dumps(old))
    assert "added (1 runs matched)" in fingerprint_results.add_fingerprints(path)
    got = json.loads(path.read_text())
    (fingerprint,) = got["corpora"].values()
    assert fingerprint.pop("recorded").startswith("after the runs, by benchmarks/fingerprint_results.py")
    assert fingerprint == want and got["runs"]["gelu"]["provenance"]["corpus_id"] == want["id"]
    assert fingerprint_results.add_fingerprints(path).endswith("already fingerprinted")


def test_set_overrides_parse_json_values_and_reach_the_settings():
    import run as bench_run

    overrides = bench_run.parse_overrides(["learning_rate=1e-3", "dataset=digits", "bf16=true"])
    assert overrides == {"learning_rate": 1e-3, "dataset": "digits", "bf16": True}
    experiment = _experiments.load_experiment("gpt2_normfree")
    settings = experiment.resolve(experiment.runs[0], "cpu", {"learning_rate": 1e-3})
    assert settings.learning_rate == 1e-3


def test_scaling_model_counts_what_the_sharded_exchange_sends(tmp_path):
    """The model's bytes are exchange_bytes' (what the gloo tests count); sharding cuts the spectra by ~W."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "perf" / "scaling_model.py"
    spec = importlib.util.spec_from_file_location("nerve_bench_scaling_model", path)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    fit = {"a": 1e-9, "b": 3.0, "points": [[4096, 1e-9 * 4096**3]], "file": "synthetic"}
    rate = {"all_reduce": 1e9, "reduce_scatter": 1e9, "reduce": 1e9, "all_gather": 1e9}
    one = model.measurement_cost(12, 3072, 1, fit, rate, "replicated")
    sharded = model.measurement_cost(12, 3072, 4, fit, rate, "sharded")
    assert one["eig_s"] == pytest.approx(24 * 1e-9 * 3072**3)
    assert sharded["eig_s"] == pytest.approx(one["eig_s"] / 4)  # 3 of 12 FFNs each
    sent = (2 * 12 * (3072 + 2) * 8) * 1.5 + 4 * 3 * 3072 * 3073 * 8 * 0.75 + 3 * (8 + 2 * 3072) * 8 * 3
    assert sharded["sent_gib"] * 2**30 == pytest.approx(sent)
    wide = model.measurement_cost(1, 8192, 1, fit, rate, "replicated")["eig_s"]
    assert wide == pytest.approx(2 * 1e-9 * 4096**3 * 8)  # beyond the widest measured matrix: D³
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "perf"
    model.main(["--out", str(tmp_path / "m.json"), "--eig-file", str(results / "eigendecomposition_cpu.json")])
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert {(r["model"], r["world"]) for r in rows} >= {("LLaMA-70B", 512), ("GPT-2 small", 1)}
    assert (tmp_path / "m.md").read_text().count("\n| ") == len(rows) + 1
