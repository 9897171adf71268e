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
    assert len(messages) == 1 and aside.name in messages[0] and "earlier run" in messages[0]
    second = runs(tmp_path / RECORDS)
    assert len(second) == 6 and len(set(second)) == 1 and second[0] != first[0]


def test_a_resumed_run_continues_its_run_id(tmp_path):
    assert train(tmp_path, max_steps=2, save_strategy="steps", save_steps=1) == []
    first = set(runs(tmp_path / RECORDS))
    messages = train(tmp_path, max_steps=3, save_strategy="no", resume=str(tmp_path / "checkpoint-1"))
    assert messages == [] and set(runs(tmp_path / RECORDS)) == first
    assert sorted(r["step"] for r in read_records(tmp_path / RECORDS)) == [1, 1, 2, 2, 3, 3]
    assert not list(tmp_path.glob("nerve_metrics.*.jsonl"))
