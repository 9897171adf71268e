"""Real file faults: a records file torn by a crash, garbage lines, an empty or foreign records file, output
folders that are files, read-only or cannot be created. A monitor loses no record and never lies; bad input
ends with one line and exit status 2."""

import json
import math
import os
import stat
import warnings

import numpy as np
import pytest
from fault_helpers import read_only, run_python, tear_last_line

from nerve_hf.analysis.runs import load_run
from nerve_hf.cli import main
from nerve_hf.errors import InputError
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sinks.records import RECORDS_FILENAME, append_records, drop_records_after, read_records
from tests.analysis.test_report import synthetic_run
from tests.probe.test_probe import gpt2_dir  # noqa: F401 - a fixture, used through model_dir

CLI = "import sys; from nerve_hf.cli import main; sys.exit(main(sys.argv[1:]))"


def record(step: int, site: str = "ffn.0", layer: int = 0) -> dict:
    """One record as the callback writes it; the metric values differ per step and site."""
    values = {name: round(1.0 + step / 100 + layer / 10 + i / 1000, 6) for i, name in enumerate(METRIC_NAMES)}
    return {"step": step, "split": "train", "site": site, "layer": layer, "dim": 5, "tokens": 8, **values}


def line(step: int, site: str = "ffn.0", layer: int = 0) -> bytes:
    return (json.dumps(record(step, site, layer)) + "\n").encode()


def same(got: list[dict], want: list[dict]) -> bool:
    """Records equal, NaN equal to NaN."""

    def key(r):
        return {k: ("nan" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}

    return [key(r) for r in got] == [key(r) for r in want]


def skipped_message(path, numbers: list[int]) -> str:
    noun = "line" if len(numbers) == 1 else "lines"
    where = f"{noun} {', '.join(map(str, numbers))}"
    return f"skipped {len(numbers)} unreadable {noun} ({where}) of {path}: cut short by a crash or not JSON"


def read_with_warnings(path) -> tuple[list[dict], list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = read_records(path)
    return records, [f"{w.category.__name__}: {w.message}" for w in caught]


# ------------------------------------------------------------------------------- records file
def test_append_after_a_torn_line_starts_a_fresh_line(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    append_records(path, [record(10)])
    append_records(path, [record(20)])
    fragment = tear_last_line(path)  # the step-20 write cut short by a crash
    append_records(path, [record(20), record(30)])  # the resumed run measures step 20 again, then 30
    records, messages = read_with_warnings(path)
    assert same(records, [record(10), record(20), record(30)])
    assert messages == [f"RuntimeWarning: {skipped_message(path, [2])}"]
    assert path.read_bytes() == line(10) + line(20)[:17] + b"\n" + line(20) + line(30)
    assert fragment == line(20)[:17].decode()


def test_append_writes_strict_json_one_line_per_record(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    path.write_bytes(b"")
    first = {
        "step": 1,
        "split": "eval",
        "site": "ffn.0",
        "tokens": np.int64(8),
        "se_pre": float("nan"),
        "pr_pre": np.float32(0.5),
        "js": float("inf"),
    }
    append_records(path, [first])
    append_records(path, [])  # nothing to write: the file stays as it is
    append_records(path, [record(2)])
    assert path.read_bytes() == (
        b'{"step": 1, "split": "eval", "site": "ffn.0", "tokens": 8, "se_pre": null, "pr_pre": 0.5, "js": null}\n'
        + line(2)
    )
    records, messages = read_with_warnings(path)
    assert messages == []
    assert same(records, [{**first, "tokens": 8, "pr_pre": 0.5, "js": math.nan}, record(2)])


def test_unreadable_lines_anywhere_are_skipped_with_one_warning_per_call(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    null_metric = json.dumps({**record(20), "se_post": None}).encode() + b"\n"
    path.write_bytes(
        line(10)
        + b"garbage\n"
        + null_metric
        + b"[1, 2]\n"
        + b"42\n"
        + b"\n"
        + b"\xff\xfe{\n"
        + line(30)
        + line(40)[:25]
    )
    for _ in range(2):
        records, messages = read_with_warnings(path)
        assert same(records, [record(10), {**record(20), "se_post": math.nan}, record(30)])
        assert messages == [f"RuntimeWarning: {skipped_message(path, [2, 4, 5, 7, 9])}"]


def test_drop_records_after_rewrites_atomically_and_keeps_the_mode(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    for step in (10, 20, 30):
        append_records(path, [record(step), record(step, "ffn.1", 1)])
    path.chmod(0o640)
    assert drop_records_after(path, 10) == 4
    assert path.read_bytes() == line(10) + line(10, "ffn.1", 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(os.listdir(tmp_path)) == [RECORDS_FILENAME]
    assert drop_records_after(path, 10) == 0 and drop_records_after(tmp_path / "missing.jsonl", 0) == 0


def test_drop_records_after_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / RECORDS_FILENAME
    append_records(path, [record(10), record(20)])
    before = path.read_bytes()

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        drop_records_after(path, 10)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [RECORDS_FILENAME]  # no temporary file left behind


def test_drop_records_after_also_drops_unreadable_lines(tmp_path):
    path = tmp_path / RECORDS_FILENAME
    append_records(path, [record(10)])
    append_records(path, [record(20)])
    tear_last_line(path)
    with pytest.warns(RuntimeWarning) as caught:
        assert drop_records_after(path, 20) == 0  # no record after step 20; the torn line goes all the same
    assert [str(w.message) for w in caught] == [skipped_message(path, [2])]
    assert path.read_bytes() == line(10)
    assert read_with_warnings(path) == ([record(10)], [])


# ------------------------------------------------------------------------- nerve report input
def hand_run(path, records_bytes: bytes):
    """A run folder with a valid trainer_state.json and ``records_bytes`` as its records file."""
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 10, "loss": 2.0}]}))
    (path / RECORDS_FILENAME).write_bytes(records_bytes)
    return path


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "is empty"),
        (b"\n  \n", "is empty"),
        (b'garbage\n[1, 2]\n{"step": 1', "holds no JSON records (is it a NerVE records file?)"),
    ],
)
def test_report_on_an_empty_or_foreign_records_file(tmp_path, capsys, content, problem):
    run = hand_run(tmp_path / "run", content)
    records = run / RECORDS_FILENAME
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error is the one message: no warning before it
        with pytest.raises(InputError) as error:
            load_run(run)
    assert str(error.value) == f"records file {str(records)!r} {problem}"
    assert main(["report", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"nerve report: error: records file {str(records)!r} {problem}\n"
    assert sorted(os.listdir(run)) == [RECORDS_FILENAME, "trainer_state.json"]


def test_report_on_a_foreign_records_file_in_a_real_process(tmp_path):
    run = hand_run(tmp_path / "run", b"garbage\n[1, 2]\n")
    result = run_python(CLI, "report", str(run))
    assert result.returncode == 2 and result.stdout == ""
    records = run / RECORDS_FILENAME
    assert result.stderr == (
        f"nerve report: error: records file {str(records)!r} holds no JSON records (is it a NerVE records file?)\n"
    )
    assert sorted(os.listdir(run)) == [RECORDS_FILENAME, "trainer_state.json"]


# ---------------------------------------------------------------------------- output folders
@pytest.fixture(scope="module")
def model_dir(gpt2_dir):  # noqa: F811 - the fixture imported above
    """test_probe's tiny GPT-2 and its BPE tokenizer, saved with save_pretrained."""
    return gpt2_dir


@pytest.fixture
def no_probe(monkeypatch):
    """Measuring fails the test: the --out checks must come first."""

    def run_probe(config):
        raise AssertionError("run_probe called although --out is unusable")

    monkeypatch.setattr("nerve_hf.probe.run_probe", run_probe)


def is_a_file_line(command: str, out) -> str:
    return f"nerve {command}: error: --out {str(out)!r} is a file, not a folder: pass a folder you can write to\n"


def test_probe_out_is_a_file(model_dir, tmp_path, capsys, no_probe):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    assert main(["probe", str(model_dir), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == is_a_file_line("probe", out)
    assert out.read_text() == "mine"


def test_probe_out_is_checked_before_the_model(tmp_path, capsys, no_probe):
    out = tmp_path / "out.txt"
    out.write_text("mine")
    assert main(["probe", str(tmp_path / "no" / "such" / "model"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == is_a_file_line("probe", out)


def test_probe_out_whose_parent_cannot_be_created(model_dir, tmp_path, capsys, no_probe):
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "out"
    assert main(["probe", str(model_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"nerve probe: error: --out {str(out)!r} cannot be created (Not a directory): pass a folder you can write to\n"
    )
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_probe_out_read_only_in_a_real_process(model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 20)
    args = [str(model_dir), "--text-file", str(text), "--no-plots", "--device", "cpu", "--no-progress", "--no-flow"]
    for out, reason in ((tmp_path / "locked", "is not writable"), (tmp_path / "locked" / "sub", "cannot be created")):
        (tmp_path / "locked").mkdir(exist_ok=True)
        with read_only(tmp_path / "locked"):
            result = run_python(CLI, "probe", *args, "--out", str(out))
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert result.stderr == (
            f"nerve probe: error: --out {str(out)!r} {reason} (Permission denied): pass a folder you can write to\n"
        )
        assert os.listdir(tmp_path / "locked") == []
    result = run_python(CLI, "probe", *args, "--out", str(tmp_path / "locked"))  # writable again: it works
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "locked")) == ["eigenvalues.npz", "report.csv", "report.json"]


def test_check_writable_dir_leaves_no_trace(tmp_path):
    from nerve_hf.sinks.files import check_writable_dir

    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_writable_dir(tmp_path, flag="the folder") == tmp_path
    assert os.listdir(tmp_path) == []


def report_run(path):
    run, state = synthetic_run(path, {"train": "loss"})
    (run / "trainer_state.json").write_text(json.dumps(state))
    return run


def test_report_out_is_a_file(tmp_path, capsys):
    run = report_run(tmp_path / "run")
    out = tmp_path / "out.txt"
    out.write_text("mine")
    assert main(["report", str(run), "--out", str(out)]) == 2
    assert capsys.readouterr().err == is_a_file_line("report", out)
    assert out.read_text() == "mine" and not (run / "nerve_report").exists()


def test_report_default_out_in_a_read_only_run_in_a_real_process(tmp_path):
    run = report_run(tmp_path / "run")
    with read_only(run):
        result = run_python(CLI, "report", str(run))
    out = run / "nerve_report"
    assert result.returncode == 2 and result.stdout == "", result.stderr
    assert result.stderr == (
        f"nerve report: error: report folder {str(out)!r} cannot be created (Permission denied): "
        f"pass --out with a folder you can write to\n"
    )
    assert sorted(os.listdir(run)) == [RECORDS_FILENAME, "trainer_state.json"]
