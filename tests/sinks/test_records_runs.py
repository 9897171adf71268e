"""Run identity: every record names its run; a fresh train() on an output folder that holds another run's
records moves them aside with one warning (never deleted, never mixed); a resumed run continues its run id;
``nerve report`` on a file holding two runs' records says so (tests/analysis/test_report_faults.py)."""

from __future__ import annotations

import re
import warnings

from trainer_helpers import make_trainer

from nerve_hf import NerveCallback
from nerve_hf.sinks.records import read_records

RECORDS = "nerve_metrics.jsonl"


def train(out, resume=None, **overrides):
    trainer = make_trainer(out, [NerveCallback(every_n_steps=1, flow=False)], eval_strategy="no", **overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return [str(w.message) for w in caught if "NerveCallback" in str(w.message)]


def runs(path):
    return [r["run"] for r in read_records(path)]


def test_a_second_train_on_the_same_folder_keeps_the_first_runs_records_aside(tmp_path):
    assert train(tmp_path, max_steps=2) == []
    first = runs(tmp_path / RECORDS)
    assert len(first) == 4 and len(set(first)) == 1 and re.fullmatch(r"[0-9a-f]{12}", first[0])
    before = (tmp_path / RECORDS).read_text()
    messages = train(tmp_path, max_steps=3)
    aside = tmp_path / f"nerve_metrics.{first[0]}.jsonl"
    assert aside.read_text() == before  # the first run's records, byte for byte
    about_records = [m for m in messages if "held the records of an earlier run" in m]
    assert len(about_records) == 1 and aside.name in about_records[0]
    second = runs(tmp_path / RECORDS)
    assert len(second) == 6 and len(set(second)) == 1 and second[0] != first[0]


def test_a_resumed_run_continues_its_run_id(tmp_path):
    assert train(tmp_path, max_steps=2, save_strategy="steps", save_steps=1) == []
    first = set(runs(tmp_path / RECORDS))
    messages = train(tmp_path, max_steps=3, save_strategy="no", resume=str(tmp_path / "checkpoint-1"))
    assert messages == [] and set(runs(tmp_path / RECORDS)) == first
    assert sorted(r["step"] for r in read_records(tmp_path / RECORDS)) == [1, 1, 2, 2, 3, 3]
    assert not list(tmp_path.glob("nerve_metrics.*.jsonl"))


def test_a_second_train_keeps_the_first_runs_spectra_aside(tmp_path):
    from nerve_hf.sinks.archive import load_spectra

    train(tmp_path, max_steps=2)
    first = sorted(p.name for p in (tmp_path / "nerve_spectra").iterdir())
    assert first == ["train-000000001.npz", "train-000000002.npz"]
    messages = train(tmp_path, max_steps=1)
    assert sorted(p.name for p in (tmp_path / "nerve_spectra.earlier").iterdir()) == first
    assert sum("nerve_spectra.earlier/" in m for m in messages) == 1
    assert sorted(set(load_spectra(tmp_path)["step"])) == [1]  # the second run's own archive


def test_partial_files_of_a_killed_write_are_removed_at_the_next_start(tmp_path):
    train(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    spectra = tmp_path / "nerve_spectra"
    partial = [spectra / ".train-000000002.npz.k3j2x9.tmp", tmp_path / ".nerve_metrics.jsonl.a81b2c.tmp"]
    for path in partial:
        path.write_bytes(b"PK\x03\x04 half a file")  # what os.replace never got to move
    other = tmp_path / ".notes.tmp"  # not ours: kept
    other.write_text("x")
    train(tmp_path, max_steps=3, save_strategy="no", resume=str(tmp_path / "checkpoint-1"))
    assert not any(path.exists() for path in partial) and other.exists()
    assert sorted(p.name for p in spectra.iterdir()) == [f"train-00000000{k}.npz" for k in (1, 2, 3)]
