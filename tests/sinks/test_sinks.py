"""Each sink on its own, on a tracker's real report: the JSONL records, the spectra archive and the histograms
(read back from a real TensorBoard event file); a failed write warns once and the next one is tried again."""

import math
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from fault_helpers import read_only, run_python
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator
from torch.utils.tensorboard import SummaryWriter
from trainer_helpers import tiny_gpt2

from nerve_hf import FFNTracker
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.report import SpectralReport
from nerve_hf.sinks.archive import ARCHIVE_DIRNAME, SpectraArchiveSink, load_position_spectra, load_spectra
from nerve_hf.sinks.base import Sink
from nerve_hf.sinks.histograms import HistogramSink, spectrum_shares
from nerve_hf.sinks.records import RECORDS_FILENAME, RecordsSink, read_records


def measured_report(seed: int = 0, **options) -> SpectralReport:
    """A tracker's report of two FFNs (width 37, flow width 24) on 2 x 9 random tokens."""
    model = tiny_gpt2()
    tracker = FFNTracker(model, **options)
    generator = torch.Generator().manual_seed(seed)
    with tracker, torch.no_grad():
        model(input_ids=torch.randint(1, 61, (2, 9), generator=generator))
    return tracker.compute()


@pytest.fixture(scope="module")
def report():
    return measured_report(flow=True, position_buckets=[0, 4], cross_layer="adjacent")


def caught_warnings(action) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        action()
    return [str(w.message) for w in caught]


def test_every_sink_offers_write_and_drop_after():
    assert all(isinstance(sink, Sink) for sink in (RecordsSink("x.jsonl"), SpectraArchiveSink("run"), HistogramSink()))
    assert not isinstance(object(), Sink)


# ------------------------------------------------------------------ records
def test_records_sink_writes_one_record_per_site_with_what_the_options_add(tmp_path, report):
    sink = RecordsSink(tmp_path / RECORDS_FILENAME)
    sink.write(report, "train", 2)
    sink.write(report, "eval", 3)
    records = read_records(tmp_path / RECORDS_FILENAME)
    assert [(r["split"], r["step"], r["site"], r["sites"]) for r in records] == [
        ("train", 2, "ffn.0", 2),
        ("train", 2, "ffn.1", 2),
        ("eval", 3, "ffn.0", 2),
        ("eval", 3, "ffn.1", 2),
    ]
    for record, row in zip(records, report.rows * 2):
        assert record["tokens"] == row["tokens"] == 18 and record["dim"] == 37
        for name in METRIC_NAMES:
            assert record[name] == pytest.approx(row[name], rel=1e-12), name
    first, last = records[0], records[1]
    assert [(b["bucket"], b["tokens"]) for b in first["positions"]] == [("0-4", 2 * 4), ("4-inf", 2 * 5)]
    assert first["cka_next"] == pytest.approx(report.to_log_dict()["nerve/ffn.0/cka_next"])
    assert "cka_next" not in last  # the last layer has no next one


def test_records_sink_drop_after_keeps_the_steps_up_to_a_checkpoint(tmp_path, report):
    sink = RecordsSink(tmp_path / RECORDS_FILENAME)
    for step in (2, 4, 6):
        sink.write(report, "train", step)
    sink.drop_after(4)
    assert sorted({r["step"] for r in read_records(tmp_path / RECORDS_FILENAME)}) == [2, 4]
    RecordsSink(tmp_path / "absent" / RECORDS_FILENAME).drop_after(0)  # nothing written yet: nothing to drop


def test_records_sink_warns_once_when_its_folder_is_a_file_and_writes_again_once_it_is_not(tmp_path, report):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    sink = RecordsSink(blocker / RECORDS_FILENAME)
    messages = caught_warnings(lambda: [sink.write(report, "train", step) for step in (1, 2, 3)])
    assert len(messages) == 1 and messages[0].startswith(
        f"NerveCallback: records are not being written to {blocker / RECORDS_FILENAME} ("
    )
    blocker.unlink()
    assert caught_warnings(lambda: sink.write(report, "train", 4)) == []
    assert {r["step"] for r in read_records(blocker / RECORDS_FILENAME)} == {4}


def test_records_sink_warns_once_when_it_cannot_drop(tmp_path):
    (tmp_path / RECORDS_FILENAME).mkdir()  # a folder where the file should be: unreadable
    sink = RecordsSink(tmp_path / RECORDS_FILENAME)
    messages = caught_warnings(lambda: [sink.drop_after(step) for step in (3, 3)])
    assert len(messages) == 1 and messages[0].startswith(
        f"NerveCallback: could not drop the records after step 3 in {tmp_path} ("
    )


# ------------------------------------------------------------------ spectra archive
def test_archive_sink_keeps_every_spectrum_of_a_measurement(tmp_path, report):
    sink = SpectraArchiveSink(tmp_path)
    sink.write(report, "train", 7)
    sink.write(SpectralReport(rows=report.rows), "train", 8)  # no spectra (a NaN report): no file
    assert [p.name for p in (tmp_path / ARCHIVE_DIRNAME).iterdir()] == ["train-000000007.npz"]
    frame = load_spectra(tmp_path)
    assert frame["site"].tolist() == ["ffn.0", "ffn.1"]
    for row in frame.itertuples():
        pre, post = report.eigenvalues[row.site]
        flow_in, flow_out = report.flow_eigenvalues[row.site]
        for got, want in ((row.pre, pre), (row.post, post), (row.input, flow_in), (row.output, flow_out)):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7 * float(want[0]))
    buckets = load_position_spectra(tmp_path)
    assert [(r.site, r.bucket) for r in buckets.itertuples()] == list(report.position_eigenvalues)


def test_archive_sink_drop_after_and_warn_once(tmp_path, report):
    sink = SpectraArchiveSink(tmp_path)
    for step in (2, 4, 6):
        sink.write(report, "eval", step)
    sink.drop_after(2)
    assert sorted(load_spectra(tmp_path)["step"].unique()) == [2]
    blocker = tmp_path / "blocked"
    blocker.write_text("not a folder")
    broken = SpectraArchiveSink(blocker)
    messages = caught_warnings(lambda: [broken.write(report, "train", step) for step in (1, 2)])
    assert len(messages) == 1 and messages[0].startswith(
        f"NerveCallback: spectra are not being written to {blocker / ARCHIVE_DIRNAME} ("
    )


READ_ONLY_RUN = """
import sys, warnings
import torch
from nerve_hf.report import SpectralReport
from nerve_hf.sinks.archive import SpectraArchiveSink
from nerve_hf.sinks.records import RecordsSink
warnings.simplefilter("always")
rows = [{"site": "ffn.0", "layer": 0, "pr_pre": 2.0}]
report = SpectralReport(rows=rows, eigenvalues={"ffn.0": (torch.ones(3), torch.ones(3))})
sinks = [RecordsSink(sys.argv[1] + "/nerve_metrics.jsonl"), SpectraArchiveSink(sys.argv[1])]
with warnings.catch_warnings(record=True) as caught:
    for step in (1, 2, 3):
        for sink in sinks:
            sink.write(report, "train", step)
print("WARNINGS", sorted(str(w.message).split(" (")[0] for w in caught))
"""


def test_sinks_in_a_read_only_folder_warn_once_each(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with read_only(out):
        proc = run_python(READ_ONLY_RUN, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = [
        f"NerveCallback: records are not being written to {out / RECORDS_FILENAME}",
        f"NerveCallback: spectra are not being written to {out / ARCHIVE_DIRNAME}",
    ]
    assert f"WARNINGS {sorted(expected)}" in proc.stdout
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------ histograms
def test_histogram_sink_draws_every_spectrum_in_a_tensorboard_event_file(tmp_path, report):
    writer = SummaryWriter(str(tmp_path))
    sink = HistogramSink(tensorboard=lambda: writer)
    sink.write(report, "train", 2)
    sink.write(measured_report(seed=1), "train", 4)
    writer.close()
    events = EventAccumulator(str(tmp_path), size_guidance={HISTOGRAMS: 0})
    events.Reload()
    tags = sorted(events.Tags()["histograms"])
    assert tags == sorted(f"train/nerve/ffn.{i}/log10_spectrum_{side}" for i in (0, 1) for side in ("pre", "post"))
    drawn = events.Histograms("train/nerve/ffn.1/log10_spectrum_post")
    assert [h.step for h in drawn] == [2, 4]
    post = report.eigenvalues["ffn.1"][1]
    positive = post[post > 0].double()
    assert drawn[0].histogram_value.num == positive.numel()  # every positive eigenvalue, once
    assert drawn[0].histogram_value.max == pytest.approx(math.log10(positive.max() / positive.sum()), rel=1e-5)
    assert drawn[0].histogram_value.min == pytest.approx(math.log10(positive.min() / positive.sum()), rel=1e-5)


def test_histogram_sink_logs_to_the_wandb_run_without_committing(report, monkeypatch):
    logged = []
    fake = types.SimpleNamespace(Histogram=lambda values: ("histogram", len(values)))
    fake.log = lambda data, commit=True: logged.append((data, commit))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    HistogramSink(wandb=lambda: fake).write(report, "eval", 6)
    ((data, commit),) = logged
    assert commit is False and data["train/global_step"] == 6
    shares = spectrum_shares(report, "eval")
    assert {k: v for k, v in data.items() if k != "train/global_step"} == {
        tag: ("histogram", len(values)) for tag, values in shares.items()
    }


def test_histogram_sink_without_a_writer_or_spectra_writes_nothing(report):
    calls = []
    HistogramSink(tensorboard=lambda: None, wandb=lambda: calls.append("asked")).write(report, "train", 1)
    assert calls == ["asked"]  # a Trainer's run may come later: asked at every write
    HistogramSink(wandb=lambda: calls.append("asked")).write(SpectralReport(rows=report.rows), "train", 2)
    assert calls == ["asked"]  # nothing to draw: not even asked


def test_histogram_sink_warns_once_when_its_writer_cannot_be_made(tmp_path, report):
    blocker = tmp_path / "blocked"
    blocker.write_text("not a folder")
    sink = HistogramSink(tensorboard=lambda: SummaryWriter(str(blocker / "runs")))
    messages = caught_warnings(lambda: [sink.write(report, "train", step) for step in (1, 2)])
    assert len(messages) == 1 and messages[0].startswith(
        "NerveCallback: spectrum histograms are not being written (NotADirectoryError"
    )
