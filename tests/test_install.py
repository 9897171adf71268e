"""The core install: a Trainer with NerveCallback trains, evaluates and writes exact records with every optional
package unimportable, and each optional path says in one line which extra to install (setup.cfg's split)."""

import configparser
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import activation_metrics

from nerve_hf.errors import MissingExtraError, requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sinks.records import read_records

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "lean_install.py"


def _setup() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config


def _names(text: str) -> set[str]:
    return {line.split(">")[0].split("[")[0].strip() for line in text.strip().splitlines() if line.strip()}


def test_core_requirements_and_extras():
    config = _setup()
    assert _names(config["options"]["install_requires"]) == {"torch", "numpy", "scipy", "transformers", "accelerate"}
    extras = config["options.extras_require"]
    assert set(extras) == {"analysis", "probe", "zoo", "test", "docs", "all"}
    every = set().union(*(_names(extras[name]) for name in ("analysis", "probe", "zoo")))
    assert _names(extras["all"]) == every
    assert "torchvision" not in every | _names(config["options"]["install_requires"])
    packages = config["options.packages.find"]["include"]
    assert "nerve_zoo" not in packages and "nerve_hf" in packages


def test_requires_names_the_extra_in_one_line():
    with pytest.raises(MissingExtraError) as caught:
        with requires("probe"):
            import sklearn_missing_for_this_test  # noqa: F401
    assert str(caught.value) == (
        "sklearn_missing_for_this_test is not installed; nerve probe and its inputs need it: "
        "pip install 'nerve_hf[probe]'"
    )
    with pytest.raises(ModuleNotFoundError) as caught:  # a module of nerve_hf itself is a bug, not an extra
        with requires("analysis"):
            import nerve_hf.no_such_module  # noqa: F401
    assert not isinstance(caught.value, MissingExtraError)
    with pytest.raises(ValueError, match="unknown extra"):
        with requires("plots"):
            pass


def test_trainer_with_callback_runs_without_the_extras(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lean modules: []" in done.stdout  # no optional package got imported after all
    # the evaluation records equal the float64 reference of the evaluation activations our own hooks kept
    acts = torch.load(tmp_path / "eval_acts.pt")
    records = [r for r in read_records(tmp_path / "nerve_metrics.jsonl") if r["split"] == "eval"]
    assert [r["site"] for r in records] == ["ffn.0", "ffn.1"]
    for record in records:
        layer = record["layer"]
        pre, post = acts[f"{layer}/pre"].double(), acts[f"{layer}/post"].double()
        assert record["tokens"] == pre.shape[0] * pre.shape[1] == 6 * 9
        want = activation_metrics(pre.reshape(-1, 37).numpy(), post.reshape(-1, 37).numpy())
        for name in METRIC_NAMES:  # float32 activations' products: JS (~6e-4) is exact to ~1e-7 absolute
            assert record[name] == pytest.approx(want[name], rel=1e-5, abs=5e-7), (record["site"], name)
    train = [r for r in read_records(tmp_path / "nerve_metrics.jsonl") if r["split"] == "train"]
    assert sorted({r["step"] for r in train}) == [1, 2] and all(np.isfinite(r["se_pre"]) for r in train)
    messages = (tmp_path / "messages.txt").read_text().splitlines()
    assert messages == [
        "nerve report exit 2: nerve report: error: pandas is not installed; nerve report, DataFrames and plots "
        "need it: pip install 'nerve_hf[analysis]'",
        "to_pandas: pandas is not installed; nerve report, DataFrames and plots need it: "
        "pip install 'nerve_hf[analysis]'",
        "load_digits: scikit-learn is not installed; nerve probe and its inputs need it: pip install 'nerve_hf[probe]'",
    ]
