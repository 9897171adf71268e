"""``nerve report`` and ``nerve probe`` on input a user gets wrong, as real processes: one line on stderr,
exit 2, naming the file or flag; a file of a run is read as its run."""

from __future__ import annotations

import json
import subprocess

import pytest
from fault_helpers import run_python
from test_report import synthetic_run

NERVE = "import sys; from nerve_hf.cli import main; sys.exit(main(sys.argv[1:]))"


def nerve(*args: str) -> subprocess.CompletedProcess:
    return run_python(NERVE, *args, drop_override=False)


def one_line(proc, prog: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("history", [5, [1, "a"], [{"step": "ten", "loss": 1.0}], "x"])
def test_report_refuses_a_trainer_state_with_a_wrong_log_history(tmp_path, history):
    run, _ = synthetic_run(tmp_path / "run", {"train": "loss"})
    (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    line = one_line(nerve("report", str(run)), "nerve report")
    assert "trainer_state.json" in line and "log_history" in line


@pytest.mark.parametrize("name", ["nerve_metrics.jsonl", "trainer_state.json"])
def test_report_reads_a_file_of_a_run_as_its_run(tmp_path, name):
    run, state = synthetic_run(tmp_path / "run", {"train": "loss"})
    (run / "trainer_state.json").write_text(json.dumps(state))
    proc = nerve("report", str(run / name))  # the default --out: the run's own nerve_report/
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"({run})" in proc.stdout and (run / "nerve_report" / "correlations.csv").is_file()


def test_report_on_another_file_asks_for_the_run_directory(tmp_path):
    other = tmp_path / "notes.txt"
    other.write_text("x")
    line = one_line(nerve("report", str(other)), "nerve report")
    assert "pass the run directory" in line and "does not exist" not in line and str(other) in line


@pytest.mark.parametrize(
    "args,named",
    [
        (["probe", "gpt2", "--max-tokens", "abc"], "--max-tokens"),
        (["report", "x", "--min-points", "y"], "--min-points"),
    ],
)
def test_a_bad_flag_value_is_one_line_not_the_usage(args, named):
    proc = nerve(*args)
    line = one_line(proc, f"nerve {args[0]}")
    assert named in line and "usage" not in proc.stderr


def test_report_on_two_runs_appended_in_one_file_names_both(tmp_path):
    run, state = synthetic_run(tmp_path / "run", {"train": "loss"})
    (run / "trainer_state.json").write_text(json.dumps(state))
    path = run / "nerve_metrics.jsonl"
    lines = path.read_text().splitlines()
    tagged = [json.dumps({"run": "aaaaaaaaaaaa", **json.loads(line)}) for line in lines]
    tagged += [json.dumps({"run": "bbbbbbbbbbbb", **json.loads(line)}) for line in lines[:4]]  # steps 10, 20
    path.write_text("\n".join(tagged) + "\n")
    proc = nerve("report", str(run), "--out", str(tmp_path / "rep"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "holds the records of 2 runs" in line]
    assert len(warned) == 1 and "aaaaaaaaaaaa (steps 10-40)" in warned[0] and "bbbbbbbbbbbb (steps 10-20)" in warned[0]
