"""The spectra archive and the TensorBoard histograms of a real Trainer run, and the archive under resume."""

import shutil

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator
from trainer_helpers import make_trainer, tiny_gpt2

from nerve_hf import FFNTracker, NerveCallback
from nerve_hf.sinks.archive import ARCHIVE_DIRNAME, load_spectra, spectra_npz, write_measurement


def test_archive_holds_every_measurement_and_tensorboard_its_histograms(tmp_path):
    trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=2)], report_to=["tensorboard"])
    trainer.train()
    names = sorted(p.name for p in (tmp_path / ARCHIVE_DIRNAME).iterdir())
    assert names == [f"eval-{s:09d}.npz" for s in (3, 6)] + [f"train-{s:09d}.npz" for s in (2, 4, 6)]
    frame = load_spectra(tmp_path)
    assert len(frame) == 5 * 2  # five measurements of two FFNs
    row = frame[(frame.split == "train") & (frame.step == 4) & (frame.site == "ffn.1")].iloc[0]
    assert row.pre.dtype == np.float32 and row.pre.shape == (37,) and np.all(np.diff(row.pre) <= 0)
    logged = next(e for e in trainer.state.log_history if e.get("step") == 4 and "nerve/ffn.1/pr_pre" in e)
    p = row.pre.astype(np.float64).clip(0)
    assert p.sum() ** 2 / (p**2).sum() == pytest.approx(logged["nerve/ffn.1/pr_pre"], rel=1e-5)  # PR from the archive
    q = row.input.astype(np.float64).clip(0)  # the flow's d = 24 input spectrum (the callback's default)
    assert row.input.shape == (24,) and q.sum() ** 2 / (q**2).sum() == pytest.approx(
        logged["nerve/ffn.1/pr_input"], rel=1e-5
    )

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent), size_guidance={HISTOGRAMS: 0})
    events.Reload()
    train = events.Histograms("train/nerve/ffn.0/log10_spectrum_pre")
    assert [h.step for h in train] == [2, 4, 6]
    assert [h.step for h in events.Histograms("eval/nerve/ffn.1/log10_spectrum_post")] == [3, 6]
    step2 = frame[(frame.split == "train") & (frame.step == 2) & (frame.site == "ffn.0")].iloc[0]
    assert train[0].histogram_value.num == int((step2.pre > 0).sum())  # every positive eigenvalue, once
    assert train[0].histogram_value.max <= 0  # log10 of a share of the variance


def test_resumed_run_archives_no_step_twice(tmp_path):
    first = make_trainer(tmp_path, [NerveCallback(every_n_steps=2)], save_strategy="steps", save_steps=3)
    first.train()
    shutil.rmtree(tmp_path / "checkpoint-6")
    full = sorted(p.name for p in (tmp_path / ARCHIVE_DIRNAME).iterdir())
    second = make_trainer(tmp_path, [NerveCallback(every_n_steps=2)], save_strategy="steps", save_steps=3)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert sorted(p.name for p in (tmp_path / ARCHIVE_DIRNAME).iterdir()) == full
    assert len(load_spectra(tmp_path)) == 5 * 2


def test_archive_files_are_whole_or_absent_and_probe_layout_matches(tmp_path):
    folder = tmp_path / ARCHIVE_DIRNAME
    write_measurement(tmp_path, "train", 7, {"ffn.0": (torch.tensor([2.0, 1.0]), torch.tensor([1.5, 0.5]))})
    (folder / ".train-000000009.npz.123.tmp").write_bytes(b"half a file")  # a writer killed mid-write
    (folder / "eval-000000009.npz").write_bytes(b"not an npz")  # a torn file under the final name
    with pytest.warns(RuntimeWarning, match="eval-000000009.npz"):
        frame = load_spectra(tmp_path)
    assert frame[["split", "step", "site"]].values.tolist() == [["train", 7, "ffn.0"]]
    model = tiny_gpt2()
    tracker = FFNTracker(model)
    with tracker, torch.no_grad():
        model(input_ids=torch.randint(1, 61, (2, 9)))
    report = tracker.compute()
    path = tmp_path / "probe.npz"
    path.write_bytes(spectra_npz(report.eigenvalues, dtype=np.float64))
    with np.load(path) as data:
        assert sorted(data.files) == ["ffn.0/post", "ffn.0/pre", "ffn.1/post", "ffn.1/pre"]
        np.testing.assert_array_equal(data["ffn.0/pre"], report.eigenvalues["ffn.0"][0].numpy())


def test_report_draws_the_spectrum_evolution_from_the_archive(tmp_path):
    from nerve_hf.analysis import run_plots
    from nerve_hf.analysis.report import write_report

    trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=1)], max_steps=6, eval_steps=2)
    trainer.train()
    trainer.save_state()
    result = write_report(tmp_path)
    names = {p.name for p in result.files}
    assert {"spectra_train.png", "cumulative_train.png", "spectra_eval.png", "cumulative_eval.png"} <= names
    spectra = load_spectra(tmp_path)
    figure = run_plots.plot_spectrum_evolution(spectra, "train")
    panels = [ax for ax in figure.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["ffn.0 pre", "ffn.0 post", "ffn.1 pre", "ffn.1 post"]
    assert all(len(ax.get_lines()) == 6 for ax in panels)  # one line per measured step
    assert panels[0].get_xscale() == panels[0].get_yscale() == "log"
    cumulative = run_plots.plot_spectrum_evolution(spectra, "eval", cumulative=True)
    lines = [ax for ax in cumulative.axes if ax.get_title()][0].get_lines()
    assert len(lines) == 3 + 1  # evaluations at steps 2, 4, 6, and the uniform diagonal
    assert lines[0].get_ydata()[-1] == pytest.approx(1.0)


def test_wandb_histograms_go_through_the_run_of_the_integration(tmp_path, monkeypatch):
    """W&B is not installed here; a stand-in module with a run records what the callback sends."""
    import sys
    import types

    logged = []
    fake = types.SimpleNamespace(run=object(), Histogram=lambda values: ("histogram", len(values)))
    fake.log = lambda data, commit=True: logged.append((data, commit))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    trainer = make_trainer(tmp_path, [NerveCallback(every_n_steps=2)], max_steps=2, eval_strategy="no")
    trainer.args.report_to = ["wandb"]  # the Trainer's own W&B callback is not installed (no wandb package)
    trainer.train()
    ((data, commit),) = logged
    assert commit is False and data["train/global_step"] == 2
    frame = load_spectra(tmp_path)
    pre = frame[(frame.step == 2) & (frame.site == "ffn.0")].iloc[0].pre
    assert data["train/nerve/ffn.0/log10_spectrum_pre"] == ("histogram", int((pre > 0).sum()))
    assert len([k for k in data if "log10_spectrum" in k]) == 4


def test_the_flow_spectra_are_archived_beside_pre_and_post(tmp_path):
    import numpy as np

    from nerve_hf.sinks.archive import load_spectra, write_measurement

    spectra = {"ffn.0": (np.array([3.0, 1.0, 0.5]), np.array([2.0, 2.0, 1.0]))}
    write_measurement(tmp_path, "eval", 10, spectra)  # no flow
    write_measurement(tmp_path, "eval", 20, spectra, flow={"ffn.0": (np.array([4.0, 1.0]), np.array([1.5, 0.5]))})
    frame = load_spectra(tmp_path)
    assert list(frame.columns) == ["split", "step", "site", "pre", "post", "input", "output"]
    assert frame["step"].tolist() == [10, 20]
    assert frame["input"][1].tolist() == [4.0, 1.0] and frame["output"][1].dtype == np.float32
    assert frame[["input", "output"]].iloc[0].isna().all()  # the measurement without flow
    assert list(load_spectra(tmp_path / "none").columns) == ["split", "step", "site", "pre", "post"]


def test_the_position_buckets_spectra_are_archived_apart_from_the_sites(tmp_path):
    import numpy as np

    from nerve_hf.sinks.archive import load_position_spectra, load_spectra, write_measurement

    spectra = {"ffn.0": (np.array([3.0, 1.0, 0.5]), np.array([2.0, 2.0, 1.0]))}
    buckets = {
        ("ffn.0", "0-4"): (np.array([5.0, 1.0, 0.0]), np.array([3.0, 2.0, 1.0])),
        ("ffn.0", "4-inf"): (np.array([2.0, 2.0, 2.0]), np.array([4.0, 0.5, 0.5])),
    }
    write_measurement(tmp_path, "eval", 10, spectra)  # no buckets
    write_measurement(tmp_path, "eval", 20, spectra, positions=buckets)
    sites = load_spectra(tmp_path)
    assert sites["site"].tolist() == ["ffn.0", "ffn.0"] and list(sites.columns)[-2:] == ["pre", "post"]
    frame = load_position_spectra(tmp_path)
    assert frame[["split", "step", "site", "bucket"]].values.tolist() == [
        ["eval", 20, "ffn.0", "0-4"],
        ["eval", 20, "ffn.0", "4-inf"],
    ]
    for row, (pre, post) in zip(frame.itertuples(), buckets.values()):
        assert row.pre.tolist() == pre.tolist() and row.post.tolist() == post.tolist()
        assert row.pre.dtype == np.float32
    empty = load_position_spectra(tmp_path / "none")
    assert empty.empty and list(empty.columns) == ["split", "step", "site", "bucket", "pre", "post"]
