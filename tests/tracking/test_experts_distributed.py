"""Routed experts under several processes: the per-expert statistics and the routing counts reduce exactly."""

from __future__ import annotations

import pytest
import torch

from nerve_hf import FFNTracker
from tests.distributed_helpers import torchrun


@pytest.mark.distributed
def test_two_processes_each_half_the_batch_equal_one(tmp_path):
    out = tmp_path / "experts.pt"
    torchrun("experts_sync.py", str(out))
    synced = torch.load(out)
    from tests.workers.experts_sync import LENGTHS, batch, model

    net = model()
    tracker = FFNTracker(net, flow=False)
    with tracker, torch.no_grad():
        net(**batch())
    one = tracker.compute()
    assert [r["site"] for r in synced["rows"]] == [r["site"] for r in one.rows]
    assert {r["kind"] for r in one.rows} == {"expert"} and len(one.rows) == 2 * 4
    for got, want in zip(synced["rows"], one.rows):
        assert got["tokens"] == want["tokens"] and got["expert"] == want["expert"]
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (want["site"], key)
    assert len(synced["routing"]) == 2
    for got, want in zip(synced["routing"], one.routing):
        assert got["tokens"] == want["tokens"] == sum(LENGTHS)
        assert got["assignments"] == want["assignments"] == 2 * sum(LENGTHS)  # real tokens x top-2
        assert got["assignments_per_expert"] == want["assignments_per_expert"]
        for key in ("dead_fraction", "load_cv", "router_entropy", "load_entropy"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), key
    # site-sharded: each MoE layer measured by its owner on the owner's tokens; every rank reports every
    # expert, and each layer's rows and routing agree on that subsample (real tokens x top-2)
    halves = (sum(LENGTHS[:3]), sum(LENGTHS[3:]))
    assert [r["site"] for r in synced["sharded_rows"]] == [r["site"] for r in one.rows]
    for routing in synced["sharded_routing"]:
        assert routing["tokens"] in halves and routing["assignments"] == 2 * routing["tokens"]
        rows = [r for r in synced["sharded_rows"] if r["layer"] == routing["layer"]]
        assert [r["tokens"] for r in rows] == routing["assignments_per_expert"]
