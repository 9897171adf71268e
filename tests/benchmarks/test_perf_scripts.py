"""benchmarks/perf/run_gpu.sh: its plan (--dry-run) names every GPU benchmark with flags they accept."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "perf" / "run_gpu.sh"


def plan() -> list[tuple[int, list[str]]]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    ).stdout
    steps = [re.match(r"\s*(\d+)s  (.*)", line) for line in out.splitlines() if not line.startswith("total")]
    assert out.splitlines()[-1] == f"total limit: {sum(int(m.group(1)) for m in steps)}s"
    return [(int(m.group(1)), m.group(2).split()) for m in steps]


def test_the_plan_fits_eight_minutes_and_covers_every_gpu_benchmark():
    steps = plan()
    assert sum(limit for limit, _ in steps) <= 8 * 60
    commands = [argv for _, argv in steps]
    assert all(argv[0] == sys.executable for argv in commands)
    assert ["-m", "pytest", "tests/test_cuda.py"] == commands[0][1:4]
    scripts = [Path(argv[1]).name for argv in commands[1:]]
    assert scripts == [
        "accumulator_throughput.py",
        "eigendecomposition.py",
        "probe_throughput.py",
        "training_overhead.py",
        "moe_overhead.py",
        "scaling_plot.py",
        "summarize.py",
    ]
    training = commands[scripts.index("training_overhead.py") + 1]
    shape, batch = training[training.index("--shape") + 1], int(training[training.index("--batch") + 1])
    assert (shape, batch * 128) == ("gpt2-small", 64 * 1024)  # GPT-2 small's shape, 64k tokens per step


def test_every_flag_in_the_plan_is_one_its_script_accepts():
    for _, argv in plan()[1:]:
        script, flags = argv[1], [arg for arg in argv[2:] if arg.startswith("--")]
        help_text = subprocess.run(
            [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        for flag in flags:
            assert re.search(rf"{flag}\b", help_text), (script, flag)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script really runs")
def test_without_a_gpu_it_says_so_and_runs_nothing():
    result = subprocess.run(
        ["bash", str(SCRIPT)], capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}
    )
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
