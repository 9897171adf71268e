"""``nerve probe`` on a checkpoint whose weights do not match its config: one line on stderr naming the
parameters and both shapes, exit status 2, nothing written (a subprocess, as a user runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file
from trainer_helpers import tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]


def probe(model_dir: Path, out: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "nerve_hf.cli", "probe", str(model_dir), "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


def test_config_edited_after_saving_names_every_mismatched_parameter(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "model")  # n_embd 24, n_inner 37
    config_path = tmp_path / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config["n_inner"] = 41
    config_path.write_text(json.dumps(config))
    line = one_line(probe(tmp_path / "model", tmp_path / "out"))
    assert line.startswith(f"nerve probe: error: cannot load model {str(tmp_path / 'model')!r} from its folder: ")
    assert "the weights do not match the config: 6 parameters of another shape" in line
    assert "transformer.h.0.mlp.c_fc.bias: checkpoint (37,), config (41,)" in line
    assert "transformer.h.0.mlp.c_fc.weight: checkpoint (24, 37), config (24, 41)" in line
    assert "and 2 more" in line and "above report" not in line
    assert not (tmp_path / "out").exists()


def test_weights_file_edited_names_the_one_parameter(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "model")
    weights_path = tmp_path / "model" / "model.safetensors"
    weights = load_file(weights_path)
    key = "transformer.h.1.mlp.c_proj.weight"
    assert tuple(weights[key].shape) == (37, 24)
    weights[key] = weights[key][:36].clone()
    save_file(weights, weights_path, metadata={"format": "pt"})
    line = one_line(probe(tmp_path / "model", tmp_path / "out"))
    assert line.endswith(
        "the weights do not match the config: 1 parameter of another shape "
        f"({key}: checkpoint (36, 24), config (37, 24)); was config.json edited, or saved with other weights?"
    )
    assert not (tmp_path / "out").exists()


def test_weights_file_missing_a_parameter_is_refused_rather_than_measured_at_random(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "model")
    weights_path = tmp_path / "model" / "model.safetensors"
    weights = load_file(weights_path)
    del weights["transformer.h.1.mlp.c_fc.weight"]  # transformers would initialise it at random and only log it
    save_file(weights, weights_path, metadata={"format": "pt"})
    line = one_line(probe(tmp_path / "model", tmp_path / "out"))
    assert line.endswith(
        "the weights lack 1 parameter the config needs (transformer.h.1.mlp.c_fc.weight); they would be measured "
        "at their random initialisation"
    )
    assert not (tmp_path / "out").exists()
