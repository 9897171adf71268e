"""Every scenario of ``tests/scenarios.py`` through every path of FFNTracker, each time against the float64
reference of the scenario's own hooks: the host path, the device path on CPU tensors, 2 gloo processes
summing their statistics, and 2 site-sharded processes (one torchrun launch runs both)."""

from __future__ import annotations

import json

import pytest
from distributed_helpers import torchrun
from scenarios import (
    SCENARIOS,
    assert_same_report,
    assert_same_row,
    build_model,
    expected_report,
    make_batch,
    report_dict,
    run_tracker,
    site_part,
    split,
)

from nerve_hf.stats.covariance import CovarianceAccumulator

WORLD = 2


@pytest.fixture
def device_path(monkeypatch):
    """CPU tensors take the accelerator's sync-free path (row weights instead of selected rows)."""
    monkeypatch.setattr(CovarianceAccumulator, "HOST_SYNC_DEVICE_TYPES", ())


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_host_path(scenario):
    model, batch = build_model(scenario.family), make_batch()
    got = report_dict(run_tracker(model, scenario, batch))
    assert_same_report(got, expected_report(model, scenario, [batch]))


@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_device_path_on_cpu_tensors(scenario, device_path):
    model, batch = build_model(scenario.family), make_batch()
    got = report_dict(run_tracker(model, scenario, batch))
    assert_same_report(got, expected_report(model, scenario, [batch]))


def test_the_scenarios_reach_what_they_are_for():
    """The batch mixes left and right padding; a cap binds on one process and across forwards on another."""
    mask = make_batch()["attention_mask"]
    assert mask[:, 0].min() == 0 and mask[:, -1].min() == 0  # left and right padding
    shares = [int(share["attention_mask"].sum()) for share in split(make_batch(), WORLD)]
    assert len(set(shares)) == WORLD  # each site-sharded owner is told apart by its token count too
    caps = [s.max_tokens for s in SCENARIOS if s.max_tokens is not None]
    assert any(min(shares) < cap < max(shares) for cap in caps)
    assert any(cap < sum(shares) for cap in caps)


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> list[dict]:
    """Each rank's reports of every scenario (one ``torchrun`` of 2 gloo processes)."""
    out = tmp_path_factory.mktemp("scenarios")
    torchrun("scenario_worker.py", str(out), nproc=WORLD)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_two_processes_sum_exactly(scenario, processes):
    """Every rank reports the rows of all tokens: the 1-process reference, or with ``max_tokens`` (a cap
    per process) the reference over each process's first ``max_tokens`` tokens."""
    model, batch = build_model(scenario.family), make_batch()
    shares = split(batch, WORLD) if scenario.max_tokens is not None else [batch]
    want = expected_report(model, scenario, shares)
    for result in processes:
        assert_same_report(result[scenario.name]["summed"], want)


@pytest.mark.distributed
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_site_sharded_owners_measure_their_own_tokens(scenario, processes):
    """Every rank reports every FFN, each measured by one process (its owner) on that process's tokens;
    with 2 FFNs each process owns one."""
    model = build_model(scenario.family)
    by_rank = [expected_report(model, scenario, [share]) for share in split(make_batch(), WORLD)]
    reports = [result[scenario.name]["site_sharded"] for result in processes]
    for report in reports[1:]:
        assert report == reports[0]  # the same rows everywhere, gathered from the owners
    report = reports[0]
    assert [row["site"] for row in report["rows"]] == [row["site"] for row in by_rank[0]["rows"]]
    owners = []
    for row in report["rows"]:
        site = row["site"]
        counts = [site_part(want, site)["rows"][0]["tokens"] for want in by_rank]  # each process's tokens
        assert counts.count(row["tokens"]) == 1, (site, row["tokens"], counts)
        owners.append(counts.index(row["tokens"]))
        assert_same_report(site_part(report, site), site_part(by_rank[owners[-1]], site))
    if len(owners) == WORLD:
        assert sorted(owners) == list(range(WORLD))


def test_the_references_of_one_and_two_shares_agree_without_a_cap():
    """Without ``max_tokens`` the reference does not depend on how the batch is shared (the 2-process
    tests compare with the 1-process reference)."""
    scenario = next(s for s in SCENARIOS if s.max_tokens is None and s.flow)
    model, batch = build_model(scenario.family), make_batch()
    one, two = expected_report(model, scenario, [batch]), expected_report(model, scenario, split(batch, WORLD))
    for part in ("rows", "positions"):
        for row, want in zip(two[part], one[part]):
            assert_same_row(row, want)
