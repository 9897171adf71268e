"""`nerve report` on a real run directory from a short Trainer run with NerveCallback."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats
from trainer_helpers import make_trainer

from nerve_hf import NerveCallback
from nerve_hf.analysis.correlations import correlations
from nerve_hf.analysis.runs import aligned, load_run
from nerve_hf.cli import main
from nerve_hf.metrics import METRIC_NAMES

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    # 6 optimizer steps, every one measured and logged; evaluations at steps 2, 4, 6.
    trainer = make_trainer(out, [NerveCallback(every_n_steps=1)], max_steps=6, eval_steps=2, logging_steps=1)
    trainer.train()
    trainer.save_state()
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def independent_pairs(run, split, site, metric):
    """(metric, loss) pairs by step, straight from the two files."""
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    loss_key = "loss" if split == "train" else f"{split}_loss"
    losses = {e["step"]: e[loss_key] for e in history if loss_key in e}
    records = [r for r in read_jsonl(run / "nerve_metrics.jsonl") if r["split"] == split]
    if site == "mean":
        by_step = {}
        for r in records:
            by_step.setdefault(r["step"], []).append(r[metric])
        values = {step: sum(v) / len(v) for step, v in by_step.items()}
    else:
        values = {r["step"]: r[metric] for r in records if r["site"] == site}
    steps = sorted(set(values) & set(losses))
    return [values[s] for s in steps], [losses[s] for s in steps]


def test_load_run_aligns_each_measurement_with_the_loss_of_its_step(run_dir):
    run = load_run(run_dir)
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    train = run.metrics[(run.metrics["split"] == "train") & (run.metrics["site"] == "mean")]
    evals = run.metrics[(run.metrics["split"] == "eval") & (run.metrics["site"] == "mean")]
    assert train["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert evals["step"].tolist() == [2, 4, 6]
    # The layer mean equals what the callback logged as nerve/mean/* next to the loss of that step.
    for entry in history:
        for prefix, frame in (("", train), ("eval_", evals)):
            key = f"{prefix}nerve/mean/pr_pre"
            if key in entry:
                value = frame[frame["step"] == entry["step"]]["pr_pre"].item()
                assert value == pytest.approx(entry[key], rel=1e-12)
    table = aligned(run)
    for entry in history:
        if "eval_loss" in entry:
            rows = table[(table["split"] == "eval") & (table["step"] == entry["step"])]
            assert len(rows) == 3 and (rows["loss"] == entry["eval_loss"]).all()  # ffn.0, ffn.1, mean
        elif "loss" in entry:
            rows = table[(table["split"] == "train") & (table["step"] == entry["step"])]
            assert len(rows) == 3 and (rows["loss"] == entry["loss"]).all()


def test_correlations_equal_scipy_on_the_same_pairs(run_dir):
    corr = correlations(load_run(run_dir))
    assert list(corr.columns) == ["split", "site", "metric", "r", "p", "n"]
    assert len(corr) == 2 * 3 * len(METRIC_NAMES)  # 2 splits x (mean, ffn.0, ffn.1) x 7 metrics
    for split, site, metric in [
        ("eval", "mean", "pr_pre"),
        ("train", "mean", "se_pre"),
        ("train", "ffn.1", "se_post"),
        ("eval", "ffn.0", "js"),
    ]:
        x, y = independent_pairs(run_dir, split, site, metric)
        expected = stats.pearsonr(x, y)
        row = corr[(corr["split"] == split) & (corr["site"] == site) & (corr["metric"] == metric)].iloc[0]
        assert row["n"] == len(x) == (3 if split == "eval" else 6)
        assert row["r"] == pytest.approx(expected.statistic, rel=1e-9, abs=1e-12)
        assert row["p"] == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def report_dir(run_dir):
    """`nerve report RUN_DIR` once (default output folder), with what it printed."""
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["report", str(run_dir)]) == 0
    return run_dir / "nerve_report", stdout.getvalue()


def test_report_files_plots_and_summary(run_dir, report_dir):
    import matplotlib.image
    import pandas as pd

    out, stdout = report_dir
    assert "train (n=6)" in stdout and "eval (n=3)" in stdout
    written = pd.read_csv(out / "correlations.csv")
    x, y = independent_pairs(run_dir, "eval", "mean", "se_pre")
    r = written[(written["split"] == "eval") & (written["site"] == "mean") & (written["metric"] == "se_pre")][
        "r"
    ].item()
    assert r == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-9)
    for split in ("train", "eval"):
        for kind in ("trajectories", "heatmaps", "scatter"):
            path = out / f"{kind}_{split}.png"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
            image = matplotlib.image.imread(path)
            assert image.shape[0] > 300 and image.shape[1] > 600 and image[..., :3].std() > 0.01
    summary = (out / "summary.md").read_text()
    assert f"| se_pre | {r:+.4f} |" in summary
    assert "![scatter_eval.png](scatter_eval.png)" in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["correlations.csv", "summary.md"]
        + [f"{k}_{s}.png" for k in ("trajectories", "heatmaps", "scatter") for s in ("train", "eval")]
        + [f"{k}_{s}.png" for k in ("spectra", "cumulative") for s in ("train", "eval")]  # from the spectra archive
    )


def test_python_api_returns_dataframes_and_figures(run_dir, report_dir):
    from matplotlib.figure import Figure

    from nerve_hf.analysis import run_plots

    run = load_run(run_dir)
    table = aligned(run)
    corr = correlations(table)
    written = __import__("pandas").read_csv(report_dir[0] / "correlations.csv")
    assert written["r"].to_numpy() == pytest.approx(corr["r"].to_numpy(), rel=1e-12, nan_ok=True)
    assert isinstance(run_plots.plot_metric_vs_loss(table, corr, "eval"), Figure)


def test_log_history_fallback_without_jsonl(run_dir, tmp_path):
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "trainer_state.json", copy)
    from_history = load_run(copy).metrics
    from_jsonl = load_run(run_dir).metrics
    keys = ["split", "step", "site"]
    merged = from_jsonl.merge(from_history, on=keys, suffixes=("", "_h"))
    assert len(merged) == len(from_jsonl) == 3 * (6 + 3)  # (ffn.0, ffn.1, mean) x (6 train + 3 eval)
    for name in METRIC_NAMES:
        assert merged[name].to_numpy() == pytest.approx(merged[f"{name}_h"].to_numpy(), rel=1e-12)


def test_constant_series_and_nan_metrics_give_nan_r(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("nerve_report"))
    records = read_jsonl(copy / "nerve_metrics.jsonl")
    for record in records:
        record["js"] = 0.5  # constant: r undefined
        if record["step"] == 2:
            record["pr_pre"] = None  # NaN (a zero-variance spectrum): that pair is left out
    (copy / "nerve_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    corr = correlations(load_run(copy))
    js = corr[corr["metric"] == "js"]
    assert js["r"].isna().all() and js["p"].isna().all()
    row = corr[(corr["split"] == "train") & (corr["site"] == "ffn.0") & (corr["metric"] == "pr_pre")].iloc[0]
    assert row["n"] == 5
    eval_row = corr[(corr["split"] == "eval") & (corr["site"] == "ffn.0") & (corr["metric"] == "pr_pre")].iloc[0]
    assert eval_row["n"] == 2 and math.isnan(eval_row["r"])  # fewer than 3 pairs


def test_too_few_measurements_exits_with_one_line_and_writes_nothing(run_dir, tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    records = [r for r in read_jsonl(run_dir / "nerve_metrics.jsonl") if r["step"] <= 2]
    (short / "nerve_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    state = json.loads((run_dir / "trainer_state.json").read_text())
    state["log_history"] = [e for e in state["log_history"] if e.get("step", 0) <= 2]
    (short / "trainer_state.json").write_text(json.dumps(state))
    (short / "nerve_report").mkdir()
    (short / "nerve_report" / "correlations.csv").write_text("earlier")
    result = subprocess.run(
        [sys.executable, "-m", "nerve_hf.cli", "report", str(short)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "too few measurements for a correlation" in lines[0], result.stderr
    assert "train: 2 measured, 2 with a loss" in lines[0] and "eval: 1 measured, 1 with a loss" in lines[0]
    assert (short / "nerve_report" / "correlations.csv").read_text() == "earlier"
    assert sorted(p.name for p in (short / "nerve_report").iterdir()) == ["correlations.csv"]


def test_not_a_run_directory(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "trainer_state.json" in line
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def synthetic_run(path, split_losses, sites=("ffn.0", "ffn.1"), steps=(10, 20, 30, 40)):
    """A run directory written by hand: records for `split_losses` {split: loss key} at `steps`."""
    path.mkdir(parents=True, exist_ok=True)
    records, history = [], []
    for k, step in enumerate(steps):
        for split, loss_key in split_losses.items():
            for layer, site in enumerate(sites):
                values = {
                    name: 1.0 + 0.1 * k * (layer + 1) + 0.01 * i + 0.003 * (k * k % 3)
                    for i, name in enumerate(METRIC_NAMES)
                }
                records.append(
                    {"step": step, "split": split, "site": site, "layer": layer, "dim": 5, "tokens": 8, **values}
                )
            history.append({"step": step, loss_key: 3.0 - 0.2 * k + 0.05 * (k % 2)})
    (path / "nerve_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, {"log_history": history, "global_step": steps[-1]}


def test_named_eval_sets_align_with_their_own_loss(tmp_path):
    run, state = synthetic_run(tmp_path / "run", {"eval_code": "eval_code_loss", "eval_web": "eval_web_loss"})
    for entry in state["log_history"]:  # the second set's loss differs: alignment must keep them apart
        if "eval_web_loss" in entry:
            entry["eval_web_loss"] = 10.0 - entry["eval_web_loss"] ** 2
    (run / "trainer_state.json").write_text(json.dumps(state))
    corr = correlations(load_run(run))
    assert sorted(set(corr["split"])) == ["eval_code", "eval_web"]
    for split in ("eval_code", "eval_web"):
        x, y = independent_pairs(run, split, "ffn.1", "eee_post")
        row = corr[(corr["split"] == split) & (corr["site"] == "ffn.1") & (corr["metric"] == "eee_post")].iloc[0]
        assert row["n"] == 4 and row["r"] == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-9)


def test_trainer_state_of_the_newest_checkpoint(tmp_path):
    run, state = synthetic_run(tmp_path / "run", {"train": "loss"})
    for step in (20, 40):
        (run / f"checkpoint-{step}").mkdir()
        partial = {"log_history": [e for e in state["log_history"] if e["step"] <= step]}
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(partial))
    loaded = load_run(run)  # no trainer_state.json of its own: checkpoint-40's
    assert loaded.losses["step"].tolist() == [10, 20, 30, 40]
    at_20 = load_run(run / "checkpoint-20")  # a checkpoint folder: the run's records up to its step
    assert sorted(set(at_20.metrics["step"])) == [10, 20]


def test_a_step_torn_by_a_crash_is_left_out_whole(tmp_path):
    from fault_helpers import tear_last_line

    steps = (10, 20, 30, 40, 50)
    run, state = synthetic_run(tmp_path / "run", {"train": "loss"}, steps=steps)
    (run / "trainer_state.json").write_text(json.dumps(state))
    complete = tmp_path / "complete"  # the same run with only its complete steps 10..40
    shutil.copytree(run, complete)
    kept = [r for r in read_jsonl(complete / "nerve_metrics.jsonl") if r["step"] <= 40]
    (complete / "nerve_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    tear_last_line(run / "nerve_metrics.jsonl")  # step 50's ffn.1 record cut short: ffn.0 survives alone

    with pytest.warns(RuntimeWarning) as caught:
        loaded = load_run(run)
    records = run / "nerve_metrics.jsonl"
    assert [str(w.message) for w in caught] == [
        f"skipped 1 unreadable line (line 10) of {records}: cut short by a crash or not JSON",
        f"left out incomplete measurements of {str(records)!r} (records missing after a crash): "
        f"train step 50 (1 of 2 sites)",
    ]
    assert sorted(set(loaded.metrics["step"])) == [10, 20, 30, 40]  # no ffn.0 row and no mean row of step 50
    assert loaded.metrics[loaded.metrics["site"] == "mean"]["step"].tolist() == [10, 20, 30, 40]
    corr = correlations(loaded)
    assert len(corr) == 3 * len(METRIC_NAMES)
    for row in corr.itertuples():
        x, y = independent_pairs(complete, "train", row.site, row.metric)
        expected = stats.pearsonr(x, y)
        assert row.n == len(x) == 4
        assert row.r == pytest.approx(expected.statistic, rel=1e-9, abs=1e-12), (row.site, row.metric)
        assert row.p == pytest.approx(expected.pvalue, rel=1e-9, abs=1e-12), (row.site, row.metric)


def test_records_missing_by_their_sites_count_leave_their_step_out(tmp_path):
    run, state = synthetic_run(tmp_path / "run", {"train": "loss", "eval": "eval_loss", "eval_web": "eval_web_loss"})
    (run / "trainer_state.json").write_text(json.dumps(state))
    missing = {("train", 30, "ffn.1"), ("eval", 20, "ffn.0")} | {("eval_web", s, "ffn.1") for s in (10, 20, 30, 40)}
    records = [
        {**r, "sites": 2}
        for r in read_jsonl(run / "nerve_metrics.jsonl")
        if (r["split"], r["step"], r["site"]) not in missing
    ]
    (run / "nerve_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    with pytest.warns(RuntimeWarning) as caught:
        loaded = load_run(run)
    assert [str(w.message) for w in caught] == [
        f"left out incomplete measurements of {str(run / 'nerve_metrics.jsonl')!r} (records missing after a crash): "
        "train step 30 (1 of 2 sites), eval step 20 (1 of 2 sites), eval_web steps 10, 20, 30, 40 (1 of 2 sites)"
    ]
    steps = {split: sorted(set(part["step"])) for split, part in loaded.metrics.groupby("split")}
    assert steps == {"train": [10, 20, 40], "eval": [10, 30, 40]}
    mean = loaded.metrics[(loaded.metrics["site"] == "mean") & (loaded.metrics["split"] == "train")]
    for step in (10, 20, 40):
        sites = [r for r in records if r["split"] == "train" and r["step"] == step]
        assert mean[mean["step"] == step]["se_pre"].item() == pytest.approx(sum(r["se_pre"] for r in sites) / 2)


def test_a_run_whose_every_measurement_is_incomplete(tmp_path, capsys):
    run, state = synthetic_run(tmp_path / "run", {"train": "loss"})
    (run / "trainer_state.json").write_text(json.dumps(state))
    records = [{**r, "sites": 3} for r in read_jsonl(run / "nerve_metrics.jsonl")]  # a third site never written
    (run / "nerve_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.warns(RuntimeWarning, match=r"train steps 10, 20, 30, 40 \(2 of 3 sites\)"):
        assert main(["report", str(run)]) == 2
    assert capsys.readouterr().err == (
        f"nerve report: error: every measurement in "
        f"{str(run / 'nerve_metrics.jsonl')!r} is incomplete (records missing after "
        f"a crash): nothing to report\n"
    )
    assert not (run / "nerve_report").exists()


# ------------------------------------------------------------------------------------ comparing runs
@pytest.fixture(scope="module")
def second_run_dir(tmp_path_factory):
    from trainer_helpers import tiny_gpt2

    out = tmp_path_factory.mktemp("run_b")
    trainer = make_trainer(
        out,
        [NerveCallback(every_n_steps=2)],
        model=tiny_gpt2(seed=5),
        max_steps=6,
        eval_steps=3,
        logging_steps=2,
        learning_rate=2e-2,
    )
    trainer.train()
    trainer.save_state()
    return out


def expected_compare_rows(name, run):
    rows = []
    for record in read_jsonl(Path(run) / "nerve_metrics.jsonl"):
        rows.append(
            {
                "run": name,
                "split": record["split"],
                "step": record["step"],
                "site": record["site"],
                "layer": record["layer"],
                "tokens": record["tokens"],
                **{m: (math.nan if record[m] is None else record[m]) for m in METRIC_NAMES},
            }
        )
    return rows


def test_compare_two_trainer_runs(run_dir, second_run_dir, tmp_path, capsys):
    import pandas as pd

    from nerve_hf.analysis import run_plots
    from nerve_hf.analysis.compare import COMPARE_COLUMNS, load_compare_inputs

    out = tmp_path / "cmp"
    assert main(["report", str(run_dir), str(second_run_dir), "--out", str(out)]) == 0
    assert "compared 2 runs" in capsys.readouterr().out
    names = [Path(run_dir).name, Path(second_run_dir).name]
    table = pd.read_csv(out / "compare.csv")
    assert list(table.columns) == COMPARE_COLUMNS
    expected = pd.DataFrame(expected_compare_rows(names[0], run_dir) + expected_compare_rows(names[1], second_run_dir))[
        COMPARE_COLUMNS
    ]
    keys = ["run", "split", "step", "site"]
    got = table.sort_values(keys).reset_index(drop=True)
    want = expected.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[keys], want[keys], check_dtype=False)
    for column in ["layer", "tokens", *METRIC_NAMES]:
        assert got[column].to_numpy(float) == pytest.approx(want[column].to_numpy(float), rel=1e-12, nan_ok=True)
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare_eval.png", "compare_train.png"]

    runs = load_compare_inputs([run_dir, second_run_dir])
    assert list(runs) == names
    for split in ("train", "eval"):
        figure = run_plots.plot_compare(runs, split)
        visible = [ax for ax in figure.axes if ax.get_visible()]
        plotted = [ax for ax in visible if ax.lines]
        assert len(plotted) == 2 * len(METRIC_NAMES)  # trajectories and last-step profiles
        for ax in plotted:
            assert len(ax.lines) == 2  # one series per run
            assert [line.get_color() for line in ax.lines] == ["C0", "C1"]
        trajectories = plotted[: len(METRIC_NAMES)]
        for ax, metric in zip(trajectories, METRIC_NAMES):
            for line, name in zip(ax.lines, names):
                mean = runs[name][(runs[name]["split"] == split) & (runs[name]["site"] == "mean")]
                assert list(line.get_xdata()) == list(mean["step"])
                assert line.get_ydata() == pytest.approx(mean[metric].to_numpy(), nan_ok=True)
        legends = [ax.get_legend() for ax in visible if ax.get_legend() is not None]
        assert len(legends) == 1 and [t.get_text() for t in legends[0].get_texts()] == names


def test_compare_model_zoo_result_file(run_dir, tmp_path):
    import pandas as pd

    path = ROOT / "benchmarks" / "results" / "cpu" / "gpt2_activations.json"
    content = json.loads(path.read_text())
    out = tmp_path / "zoo"
    assert main(["report", str(path), str(run_dir), "--out", str(out)]) == 0
    table = pd.read_csv(out / "compare.csv")
    names = [f"gpt2_activations/{key}" for key in content["runs"]]
    assert list(dict.fromkeys(table["run"])) == [*names, Path(run_dir).name]
    for key, name in zip(content["runs"], names):
        nerve = content["runs"][key]["nerve"]
        part = table[table["run"] == name]
        assert set(part["split"]) == {"eval"} and len(part) == len(nerve["steps"]) * len(nerve["sites"])
        for i, step in enumerate(nerve["steps"]):
            for k, site in enumerate(nerve["sites"]):
                row = part[(part["step"] == step) & (part["site"] == site)].iloc[0]
                for metric in METRIC_NAMES:
                    assert row[metric] == pytest.approx(nerve["per_site"][metric][i][k], nan_ok=True)
    assert (out / "compare_eval.png").is_file() and (out / "compare_train.png").is_file()


def test_compare_bad_input_is_one_line(run_dir, tmp_path, capsys):
    bogus = tmp_path / "x.json"
    bogus.write_text('{"a": 1}')
    assert main(["report", str(run_dir), str(bogus), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model-zoo result file" in err[0]


# ------------------------------------------------------------------------------------ layers_per_step runs
def test_layers_per_step_run_has_no_layer_mean(tmp_path):
    """A round-robin run measures ffn.0 at odd steps and ffn.1 at even ones: no step holds both, so a
    "layer mean" over steps would be a different single layer each time. The report builds none; each site's
    correlation uses that site's own steps only."""
    out = tmp_path / "run"
    callback = NerveCallback(every_n_steps=1, layers_per_step=1)
    trainer = make_trainer(out, [callback], max_steps=8, eval_strategy="no", logging_steps=1)
    trainer.train()
    trainer.save_state()
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert not any("nerve/mean/se_pre" in entry for entry in history)  # the callback logs no mean either
    run = load_run(out)
    assert "mean" not in set(run.metrics["site"])
    assert [sorted(set(part["site"])) for _, part in run.metrics.groupby("step")] == [["ffn.0"], ["ffn.1"]] * 4
    corr = correlations(run)
    assert sorted(set(corr["site"])) == ["ffn.0", "ffn.1"]
    for row in corr.itertuples():
        x, y = independent_pairs(out, "train", row.site, row.metric)
        assert row.n == len(x) == 4
        assert row.r == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-9, abs=1e-12), (row.site, row.metric)
    assert main(["report", str(out), "--min-points", "3"]) == 0
    summary = (out / "nerve_report" / "summary.md").read_text()
    assert "layer-mean" not in summary and "## `train`: no layer mean" in summary
    written = json.loads(json.dumps(sorted(p.name for p in (out / "nerve_report").iterdir())))
    assert "scatter_train.png" not in written and "trajectories_train.png" in written


def test_a_mean_needs_the_same_sites_at_every_step_of_its_split(tmp_path):
    run, state = synthetic_run(tmp_path / "run", {"train": "loss", "eval": "eval_loss"})
    (run / "trainer_state.json").write_text(json.dumps(state))
    records = read_jsonl(run / "nerve_metrics.jsonl")
    # eval step 20 measured ffn.0 only, step 30 ffn.1 only (records that say so: nothing is missing)
    dropped = {("eval", 20, "ffn.1"), ("eval", 30, "ffn.0")}
    kept = [{**r, "sites": 1 if r["split"] == "eval" and r["step"] in (20, 30) else 2} for r in records]
    kept = [r for r in kept if (r["split"], r["step"], r["site"]) not in dropped]
    (run / "nerve_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    loaded = load_run(run)
    means = loaded.metrics[loaded.metrics["site"] == "mean"]
    assert sorted(set(means["split"])) == ["train"] and means["step"].tolist() == [10, 20, 30, 40]


def test_trend_free_correlation_beside_pearson_r(run_dir, report_dir):
    """issue #29: r of the first differences (the shared trend removed), n, and the few-points flag."""
    import numpy as np
    import pandas as pd

    out, stdout = report_dir
    written = pd.read_csv(out / "correlations.csv")
    for split, site, metric in [("train", "mean", "se_pre"), ("train", "ffn.1", "pr_post"), ("eval", "mean", "js")]:
        x, y = independent_pairs(run_dir, split, site, metric)
        row = written[(written["split"] == split) & (written["site"] == site) & (written["metric"] == metric)].iloc[0]
        assert row["n_diff"] == len(x) - 1 and bool(row["few_points"]) == (len(x) < 8)
        if len(x) - 1 >= 3:
            want = stats.pearsonr(np.diff(x), np.diff(y))
            assert row["r_diff"] == pytest.approx(want.statistic, rel=1e-9, abs=1e-12)
            assert row["p_diff"] == pytest.approx(want.pvalue, rel=1e-9, abs=1e-12)
        else:  # eval: 3 points, 2 changes: too few for r
            assert math.isnan(row["r_diff"])
    assert "train r of step-to-step changes, trend removed (n=5)" in stdout
    assert "train: r from fewer than 8 points" in stdout
    summary = (out / "summary.md").read_text()
    assert "| metric | r | p | n | r(Δ) | p(Δ) | n(Δ) | |" in summary and "few (< 8)" in summary


def test_report_shows_the_variance_flow(run_dir):
    """The callback measures the flow by default: the report's run keeps it and draws a flow panel per metric."""
    from nerve_hf.analysis import run_plots

    run = load_run(run_dir)
    records = [r for r in read_jsonl(run_dir / "nerve_metrics.jsonl") if r["split"] == "eval" and r["step"] == 4]
    mean = run.metrics[(run.metrics["split"] == "eval") & (run.metrics["site"] == "mean") & (run.metrics["step"] == 4)]
    for key in ("se_input", "pr_output", "js_input_pre"):
        assert mean[key].item() == pytest.approx(sum(r[key] for r in records) / len(records), rel=1e-12)
    figure = run_plots.plot_trajectories(run.metrics, "eval", run.losses)
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles[-3:] == [f"{k} through the FFN (layer mean)" for k in ("SE", "PR", "EEE")]
    flow_ax = [ax for ax in figure.axes if ax.get_title() == "SE through the FFN (layer mean)"][0]
    lines = {line.get_label(): line.get_ydata() for line in flow_ax.get_lines()}
    assert lines["input"][1] == pytest.approx(mean["se_input"].item(), rel=1e-12)


def test_spectrum_figures_cut_at_the_floor_on_log_rank_axes(run_dir):
    import numpy as np

    from nerve_hf.analysis import run_plots
    from nerve_hf.sinks.archive import load_spectra

    spectra = load_spectra(run_dir)
    figure = run_plots.plot_spectrum_evolution(spectra, "train")
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.get_title().startswith("ffn.")]
    assert len(panels) == 4 and {ax.get_xscale() for ax in panels} == {"log"}
    assert not any(
        line.get_visible()
        for ax in panels
        for line in ax.xaxis.get_minorticklines()
        if ax.xaxis._minor_tick_kw.get("gridOn")
    )
    for ax in panels:
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata(), dtype=float)
            if len(y) > 2:  # a spectrum, not the rank-bound marker
                assert y.min() >= run_plots.SPECTRUM_FLOOR * y.max() * (1 - 1e-12)
    cumulative = run_plots.plot_spectrum_evolution(spectra, "train", cumulative=True)
    panels = [ax for ax in cumulative.axes if ax.get_visible() and ax.get_title().startswith("ffn.")]
    assert {ax.get_xscale() for ax in panels} == {"log"}
    first = panels[0].get_lines()[0]
    assert np.asarray(first.get_xdata())[0] == 1 and np.asarray(first.get_ydata())[-1] == pytest.approx(1.0)
