"""benchmarks/: the cpu-long and gpu-short presets, dense-early evaluation, the one-epoch check, packed token
data, corpus fingerprints in result files, the gpu-short script's dry run, and tables.py reproducing the
committed README byte for byte. Tiny models and tiny corpora only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import _experiments  # noqa: E402
import _settings  # noqa: E402

BYTES_PER_TOKEN = 3.3  # below what the 8192-token BPE gives on python-env (3.7): a safe token estimate


from test_benchmarks import offline_cache_and_one_thread  # noqa: E402, F401  (autouse here too)


def _all_runs(preset):
    for name in _experiments.list_experiments():
        experiment = _experiments.load_experiment(name)
        for run in experiment.runs_for(preset):
            yield name, run.name, experiment.resolve(run, preset)


# --------------------------------------------------------------------------- presets
def test_cpu_long_runs_are_sized_as_documented_and_never_repeat_an_epoch():
    runs = list(_all_runs("cpu-long"))
    assert len(runs) == 37  # 33 + the moe experiment (issue 27)
    for experiment, run, s in runs:
        if s.task == "image":
            assert s.dataset == "digits" and s.eval_dense_every > 0
            continue
        assert (s.dataset, s.vocab_size, s.max_epochs) == ("python-env", 8192, 1.0), (experiment, run)
        assert s.max_steps == 2000 and s.eval_dense_until == 0.1
        schedule = s.eval_schedule(s.max_steps)
        assert schedule[:3] == [10, 20, 30] and schedule[-2:] == [1900, 2000] and len(schedule) == 38
        train_tokens = s.corpus_max_bytes * (1 - 0.07) / BYTES_PER_TOKEN  # ~5% of the files are validation
        assert s.max_steps * s.tokens_per_step <= train_tokens, (experiment, run)
        family_width = s.model_overrides.get("n_embd", s.model_overrides.get("hidden_size"))
        assert family_width in (128, 256), (experiment, run)  # 256: the LLaMA M scale
        assert s.block_size in (64, 128)


def test_gpu_short_runs_use_packed_tokens_and_bf16():
    for experiment, run, s in _all_runs("gpu-short"):
        assert s.bf16, (experiment, run)
        if s.task == "lm":
            assert s.packed_data == _settings.PACKED_DATA_DIR and s.max_epochs == 1.0
            assert s.max_steps * s.tokens_per_step <= 10_000_000  # the default pack holds ~10.2M train tokens


def test_check_epochs_refuses_a_run_that_would_repeat_tokens():
    from _train import check_epochs

    s = _settings.resolve("cpu-long", "lm", {"max_steps": 100, "batch_size": 8})
    check_epochs(s, n_train_blocks=800, max_steps=100)  # exactly one epoch: fine
    with pytest.raises(ValueError, match="max_epochs=1"):
        check_epochs(s, n_train_blocks=799, max_steps=100)
    check_epochs(_settings.resolve("cpu", "lm"), n_train_blocks=1, max_steps=300)  # no limit in cpu


# --------------------------------------------------------------------------- dense-early evaluation, fingerprints
def test_dense_schedule_and_corpus_fingerprint_reach_the_result_file(tmp_path):
    import run as bench_run

    sets = ["max_steps=6", "eval_every=3", "eval_dense_every=1", "eval_dense_until=0.34", "eval_samples=4"]
    argv = ["gpt2_activations", "--preset", "smoke", "--runs", "gelu", "--out", str(tmp_path), "--quiet"]
    bench_run.main(argv + [arg for pair in sets for arg in ("--set", pair)])
    result = json.loads((tmp_path / "smoke" / "gpt2_activations.json").read_text())
    entry = result["runs"]["gelu"]
    assert entry["history"]["step"] == entry["nerve"]["steps"] == [1, 2, 3, 6]
    (corpus_id,) = result["corpora"]
    fp = result["corpora"][corpus_id]
    assert entry["provenance"]["corpus_id"] == corpus_id == fp["id"]
    assert fp["corpus"] == "stdlib-code" and fp["files"] > 0 and len(fp["files_sha256"]) == 64
    assert len(result["environment"]["git_commit"]) == 40 and "git_dirty" in result["environment"]
    assert entry["provenance"]["git_commit"] == result["environment"]["git_commit"]

    import tables

    text = tables.render(tables.load_results(tmp_path, "smoke"), "smoke", [], tmp_path / "README.md")
    assert f"id `{corpus_id}`" in text and f"Commit: `{entry['provenance']['git_commit'][:10]}`" in text
    # a file completed at two commits (--resume) names each run's
    relu = json.loads(json.dumps(entry))
    relu["provenance"].update(git_commit="0123456789abcdef", git_dirty=True)
    entry["provenance"].update(git_commit="fedcba9876543210", git_dirty=False)
    result["runs"]["relu"] = relu
    assert tables.commit_text(result) == "Commits: `fedcba9876` (GELU); `0123456789` (with local changes) (ReLU)"


# --------------------------------------------------------------------------- packed tokens
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    import pack_corpus

    out = tmp_path_factory.mktemp("packed")
    meta = pack_corpus.pack(out, corpus="stdlib-code", max_bytes=60_000, vocab_size=300)
    return out, meta


def test_packed_tokens_round_trip_and_are_checked(packed, tmp_path):
    import shutil

    import pack_corpus
    from transformers import PreTrainedTokenizerFast

    out, meta = packed
    data = pack_corpus.load_packed(out)
    assert data.train.size == meta["tokens"]["train"] > 1000 and meta["fingerprint"]["corpus"] == "stdlib-code"
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))
    from nerve_hf.data import load_embedded_corpus

    first_doc = tokenizer.decode(data.train[: list(data.train).index(meta["eos_token_id"])].tolist())
    assert first_doc == load_embedded_corpus("stdlib-code", max_bytes=60_000)["train"][0]["text"]  # exact bytes
    blocks = pack_corpus.TokenBlocks(data.train, 16, limit=5)
    assert len(blocks) == 5 and blocks[4]["input_ids"].tolist() == data.train[64:80].tolist()
    assert torch.equal(blocks[0]["input_ids"], blocks[0]["labels"])
    with pytest.raises(IndexError):
        blocks[5]
    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    raw = bytearray((tampered / "train.bin").read_bytes())
    raw[0] ^= 1
    (tampered / "train.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        pack_corpus.load_packed(tampered)
    with pytest.raises(FileNotFoundError, match="pack_corpus.py"):
        pack_corpus.load_packed(tmp_path / "nothing")


def test_a_run_trains_on_packed_tokens_without_datasets_installed(packed):
    """As on the GPU machine, whose image has neither ``datasets`` nor ``evaluate``."""
    out, meta = packed
    overrides = {"packed_data": str(out), "max_steps": 2, "eval_every": 2, "eval_samples": 4, "max_epochs": 1.0}
    script = (
        "import json, sys\n"
        "sys.modules['datasets'] = sys.modules['evaluate'] = None  # importing either now fails\n"
        f"sys.path[:0] = [{str(BENCH)!r}, {str(REPO)!r}]\n"
        "import torch; torch.set_num_threads(1)\n"
        "import _settings\nfrom _train import train_run\n"
        f"entry = train_run(_settings.resolve('smoke', 'lm', {overrides!r}), progress=False)\n"
        "print(json.dumps(entry['provenance']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    entry = {"provenance": json.loads(done.stdout.strip().splitlines()[-1])}
    assert entry["provenance"]["steps"] == 2 and entry["provenance"]["eval_blocks"] == 4
    fp = entry["provenance"]["corpus_fingerprint"]
    assert fp["id"] == meta["fingerprint"]["id"] and fp["packed"]["tokens"] == meta["tokens"]


# --------------------------------------------------------------------------- gpu-short script
def test_gpu_short_script_dry_run_prints_every_experiment_and_writes_nothing(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "RESULTS": str(tmp_path / "results"), "LOGS": str(tmp_path / "l")}
    done = subprocess.run(
        ["bash", str(BENCH / "run_gpu_short.sh"), "--dry-run"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    for name in _experiments.list_experiments():
        assert f"{name} [gpu-short]" in done.stdout
        assert f"benchmarks/run.py {name} --preset gpu-short" in done.stdout
    assert "bf16" in done.stdout and "tables.py" in done.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "l").exists()
    again = subprocess.run(
        ["bash", str(BENCH / "run_gpu_short.sh")],
        capture_output=True,
        text=True,
        env={**env, "DRY_RUN": "1"},
        timeout=300,
    )
    assert again.returncode == 0 and again.stdout == done.stdout


# --------------------------------------------------------------------------- tables.py reproduces the README
def test_tables_regenerate_the_committed_readme_byte_for_byte():
    import tables

    readme = tables.DEFAULT_RESULTS / "README.md"
    title = readme.read_text().splitlines()[0]  # "# NerVE model-zoo results (`cpu`, `cpu-long` presets)"
    presets = title.split("`")[1::2]
    assert presets and presets[0] == "cpu"
    sections = []
    for k, preset in enumerate(presets):  # as tables.main lays them out
        results = tables.load_results(tables.DEFAULT_RESULTS, preset)
        figures_dir = readme.parent / "figures" / ("" if k == 0 else preset)
        figures = [path for path, _ in tables.figure_plan(results, figures_dir)]
        assert results and all(path.is_file() for path in figures), preset
        sections.append((preset, results, figures))
    assert tables.render_presets(sections, readme) == readme.read_text()


def test_findings_across_presets_set_each_presets_verdict_beside_the_paper():
    import tables
    from _findings import CHECKS, check_all

    cpu = tables.load_results(tables.DEFAULT_RESULTS, "cpu")
    shorter = json.loads(json.dumps(cpu))  # the same files with the NormFree runs removed: that check is "not run"
    del shorter["gpt2_normfree"]
    lines = tables.findings_across_presets([("cpu", cpu, []), ("cpu-long", shorter, [])])
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| finding")]
    assert len(rows) == len(CHECKS)
    for row, mine, other in zip(rows, check_all(cpu), check_all(shorter)):
        cells = row.strip("| ").split(" | ")
        assert cells[:2] == [mine.topic, mine.paper] and mine.topic and mine.paper
        assert cells[2] == f"**{mine.verdict}**: {mine.headline}" and cells[3].startswith(f"**{other.verdict}**")
    assert "**not run**" in rows[2]  # NormFree ReLU PR gain, without gpt2_normfree
    undecided = [f for f in check_all(cpu) if f.undecided]
    assert undecided and all(f"- **{f.topic}**, `cpu` ({f.verdict}): {f.undecided}" in lines for f in undecided)
    assert all(f.verdict != "supported" for f in undecided)


def _replicate(result: dict, seed: int, runs=None) -> dict:
    """A copy of ``result`` relabelled as trained with ``seed`` (only ``runs``, if given)."""
    replicate = json.loads(json.dumps(result))
    replicate["runs"] = {k: v for k, v in replicate["runs"].items() if runs is None or k in runs}
    for entry in replicate["runs"].values():
        entry["settings"]["seed"] = seed
    return replicate


@pytest.fixture
def cpu_long_copy(tmp_path):
    import shutil

    import tables

    shutil.copytree(tables.DEFAULT_RESULTS / "cpu-long", tmp_path / "cpu-long", ignore=shutil.ignore_patterns("seeds"))
    (tmp_path / "cpu-long" / "seeds").mkdir()
    return tmp_path


def test_seed_replicates_enter_the_normfree_relu_check_seed_by_seed(cpu_long_copy):
    import tables
    from _findings import normfree_relu_pr_gain

    seeds_dir = cpu_long_copy / "cpu-long" / "seeds"
    seed0 = json.loads((cpu_long_copy / "cpu-long" / "gpt2_normfree.json").read_text())
    replicate = _replicate(seed0, 42)  # a seed above every gain: seeds are labels, never compared as gains
    final = replicate["runs"]["normfree-relu"]["nerve"]["per_site"]["pr_post"][-1]
    final[:] = [2 * x for x in final]  # seed 42: NormFree ReLU reinjects twice as much
    (seeds_dir / "gpt2_normfree.seed42.json").write_text(json.dumps(replicate))
    (seeds_dir / "gpt2_activations.seed42.json").write_text(json.dumps({**_replicate(seed0, 42), "runs": {}}))

    def gain(entry):  # mean over layers of PR_post / PR_pre at the final evaluation
        per_site = entry["nerve"]["per_site"]
        return float(np.mean(np.array(per_site["pr_post"][-1]) / np.array(per_site["pr_pre"][-1])))

    names = {"normfree-gelu": "NormFree GELU", "normfree-relu": "NormFree ReLU", "normfree-lrelu": "NormFree LReLU"}
    by_seed = [{label: gain(result["runs"][run]) for run, label in names.items()} for result in (seed0, replicate)]
    results = tables.load_results(cpu_long_copy, "cpu-long")
    loaded = results["gpt2_normfree"]["replicates"]
    assert [r["runs"]["normfree-relu"]["settings"]["seed"] for r in loaded] == [42]
    assert "replicates" not in results["gpt2_activations"]  # a replicate file of no runs is left out
    finding = normfree_relu_pr_gain(results)
    relu_largest = [g["NormFree ReLU"] > max(g["NormFree GELU"], g["NormFree LReLU"]) for g in by_seed]
    assert relu_largest == [False, True]  # the committed seed 0 has LReLU ahead; the edited seed 42 has ReLU
    assert finding.verdict == "mixed"
    g = by_seed[1]
    row = f"| 42 | {g['NormFree GELU']:.2f} | {g['NormFree ReLU']:.2f} | {g['NormFree LReLU']:.2f} | NormFree ReLU |"
    assert row in finding.evidence
    relu = [g["NormFree ReLU"] for g in by_seed]
    assert f"NormFree ReLU {np.mean(relu):.2f} ± {np.std(relu, ddof=1):.2f}" in finding.headline
    assert finding.headline.endswith("NormFree ReLU the largest in 1/2 seeds")
    assert finding.undecided.startswith("Over 2 seeds NormFree ReLU's gain is the largest in 1 and above NormFree")
    paired = [g["NormFree ReLU"] - g["NormFree LReLU"] for g in by_seed]  # seed-paired, not pooled
    assert f"NormFree LReLU's by {np.mean(paired):+.2f} ± {np.std(paired, ddof=1):.2f}" in finding.undecided


def test_a_replicate_of_normfree_relu_alone_is_shown_but_not_compared(cpu_long_copy):
    import tables
    from _findings import normfree_relu_pr_gain

    seed0 = json.loads((cpu_long_copy / "cpu-long" / "gpt2_normfree.json").read_text())
    without = normfree_relu_pr_gain(tables.load_results(cpu_long_copy, "cpu-long"))  # seed 0 alone
    alone = _replicate(seed0, 3, runs=["normfree-relu"])
    (cpu_long_copy / "cpu-long" / "seeds" / "gpt2_normfree.seed3.json").write_text(json.dumps(alone))
    finding = normfree_relu_pr_gain(tables.load_results(cpu_long_copy, "cpu-long"))
    assert finding.verdict == "contradicted" == without.verdict  # seed 0 decides: LReLU is ahead there
    assert finding.headline == without.headline and finding.undecided == without.undecided
    assert "the seeds are not compared" in finding.evidence and "| 3 |" in finding.evidence
    assert finding.headline.startswith("mean PR_post/PR_pre: NormFree GELU")


def test_a_replicate_that_differs_in_more_than_its_seed_is_refused(cpu_long_copy):
    import tables

    seed0 = json.loads((cpu_long_copy / "cpu-long" / "gpt2_normfree.json").read_text())
    other = _replicate(seed0, 1)
    other["runs"]["normfree-gelu"]["settings"]["learning_rate"] = 0.5
    (cpu_long_copy / "cpu-long" / "seeds" / "gpt2_normfree.seed1.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"run normfree-gelu differs .* more than its seed \(learning_rate: 0.002"):
        tables.load_results(cpu_long_copy, "cpu-long")


# --------------------------------------------------------------------------- estimate.py
def test_estimate_times_a_few_steps_and_scales_to_the_preset(capsys):
    import estimate

    (row,) = estimate.main(["gpt2_activations", "--preset", "smoke", "--runs", "gelu", "--steps", "2"])
    assert (row["steps"], row["evals"]) == (3, 3)  # the smoke preset's run, not the 2 timed steps
    assert row["run_cpu_s"] == pytest.approx(3 * row["step_cpu_s"] + 3 * row["eval_cpu_s"])
    assert "| gpt2_activations | gelu | 3 | 3 |" in capsys.readouterr().out


def test_add_run_keeps_one_fingerprint_per_corpus_and_warns_on_a_second(capsys):
    from _results import add_run

    result = {"runs": {}, "corpora": {}}
    add_run(result, "b", {"provenance": {"corpus_fingerprint": {"id": "x", "files": 3}}}, ["a", "b"])
    add_run(result, "a", {"provenance": {"corpus_fingerprint": {"id": "x", "files": 3}}}, ["a", "b"])
    assert list(result["runs"]) == ["a", "b"] and result["corpora"] == {"x": {"id": "x", "files": 3}}
    assert result["runs"]["a"]["provenance"] == {"corpus_id": "x"}
    assert capsys.readouterr().err == ""
    add_run(result, "c", {"provenance": {"corpus_fingerprint": {"id": "y"}}}, ["a", "b"])  # resumed elsewhere
    assert set(result["corpora"]) == {"x", "y"} and list(result["runs"]) == ["a", "b", "c"]
    assert "used corpus y" in capsys.readouterr().err


# --------------------------------------------------------------------------- the collapse-phase boundary
def test_after_collapse_starts_at_the_lowest_mean_se_pre_and_correlates_from_there():
    from _stats import after_collapse, collapse_end

    steps = [10, 20, 30, 40, 50, 60]
    se_pre = [3.0, 2.0, 1.0, 1.5, 2.1, 2.4]  # collapse to step 30, then the paper's regime
    pr_pre = [9.0, 5.0, 2.0, 3.0, 4.5, 5.5]
    loss = [6.0, 5.0, 4.5, 4.2, 4.0, 3.9]
    entry = {
        "nerve": {"steps": steps, "mean": {"all": {"se_pre": se_pre, "pr_pre": pr_pre}}},
        "history": {"step": steps, "eval_loss": loss},
    }
    assert collapse_end(se_pre) == 2 and collapse_end([None, float("nan")]) is None
    got = after_collapse(entry)
    assert got["from_step"] == 30 and got["se_pre"]["n"] == 4
    assert got["se_pre"]["r"] == pytest.approx(np.corrcoef(se_pre[2:], loss[2:])[0, 1], rel=1e-12)
    assert got["pr_pre"]["r"] < -0.9 and np.corrcoef(se_pre, loss)[0, 1] > 0  # all evaluations: the other sign


def test_even_spacing_keeps_the_evaluations_at_multiples_of_eval_every():
    from _stats import even_spacing

    steps = [10, 20, 30, 100, 200, 250]  # a dense opening, two even checkpoints, the last step
    se_pre = [3.0, 1.0, 1.2, 2.0, 2.5, 2.6]
    loss = [6.0, 5.0, 4.8, 4.0, 3.5, 3.4]
    entry = {
        "nerve": {"steps": steps, "mean": {"all": {"se_pre": se_pre, "pr_pre": se_pre}}},
        "history": {"step": steps, "eval_loss": loss},
        "settings": {"eval_every": 100},
    }
    got = even_spacing(entry)
    assert got["every"] == 100 and got["se_pre"]["n"] == 3
    want = np.corrcoef([2.0, 2.5, 2.6], [4.0, 3.5, 3.4])[0, 1]
    assert got["se_pre"]["r"] == pytest.approx(want, rel=1e-12) and got["pr_pre"]["r"] == got["se_pre"]["r"]
    assert np.corrcoef(se_pre, loss)[0, 1] < 0.5  # all six: the dense opening pulls r towards zero
