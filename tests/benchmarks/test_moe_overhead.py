"""benchmarks/perf/moe_overhead.py runs at a tiny size, and the expert state it reads from the tracker is the
formula 2 x (F^2 + F) x 8 bytes per measured expert, with and without the expert round-robin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "perf" / "moe_overhead.py"


def test_help_names_its_flags():
    text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--tokens", "--hidden", "--qwen-experts", "--shapes", "--device", "--threads"):
        assert flag in text


def test_tiny_run_writes_results_whose_state_is_the_formula(tmp_path):
    args = ["--device", "cpu", "--quick", "--tokens", "48", "--hidden", "16", "--qwen-experts", "8", "--threads", "1"]
    subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)], check=True, capture_output=True)
    result = json.loads((tmp_path / "moe_overhead_cpu_quick.json").read_text())
    rows = {(r["shape"], r["experts_per_step"]): r for r in result["results"]}
    assert set(rows) == {("mixtral", None), ("mixtral", 2), ("qwen3_moe", None), ("qwen3_moe", 8)}
    for (shape, per_step), row in rows.items():
        width, experts = (1024, 8) if shape == "mixtral" else (768, 8)
        assert (row["width"], row["experts"]) == (width, experts)
        measured = per_step or experts
        assert row["measured_experts"] == measured
        # every measured expert got tokens here (48 tokens x top-k): its state is allocated, the others' not
        assert row["state_bytes"] == row["formula_bytes"] == 2 * (width**2 + width) * 8 * measured
        assert row["formula_bytes"] < row["budget_bytes"] <= row["formula_bytes"] + (experts + 2) * 8
        assert row["plain_forward_s"] > 0 and row["measured_forward_s"] > 0
    assert (tmp_path / "moe_overhead_cpu_quick.md").read_text().count("| mixtral |") == 2
