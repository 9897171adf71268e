"""Sharded spectra under real torchrun processes: each rank decomposes only its share, every rank ends
with every row, equal to one process on the same tokens, and the bytes sent match the formula."""

import json

import numpy as np
import pytest
from distributed_helpers import torchrun

from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.parallel.sharded_spectra import assign_owners, exchange_bytes
from nerve_hf.tracking.measurements.flow import FLOW_KEYS

D = 37  # tiny_gpt2's FFN width


def run(tmp_path, nproc: int, n_layer: int, metrics: str) -> list[dict]:
    out = tmp_path / f"w{nproc}"
    out.mkdir()
    torchrun("sharded_spectra.py", str(out), str(n_layer), metrics, nproc=nproc)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_owners_balance_the_cubic_work():
    assert assign_owners([37] * 3, 2) == [0, 1, 0]
    assert assign_owners([4096, 1024, 1024, 1024], 2) == [0, 1, 1, 1]  # one big FFN outweighs three small
    assert sorted(assign_owners([11] * 8, 4)) == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "nproc,n_layer,metrics",
    [(2, 3, "all"), (4, 3, "all"), (2, 3, "pr"), (4, 1, "all")],  # last: reduce per owner
)
def test_each_rank_decomposes_its_share_and_all_log_the_same(tmp_path, nproc, n_layer, metrics):
    (one,) = run(tmp_path, 1, n_layer, metrics)
    ranks = run(tmp_path, nproc, n_layer, metrics)
    owners = assign_owners([D] * n_layer, nproc)
    for rank, result in enumerate(ranks):
        assert [row["site"] for row in result["rows"]] == [row["site"] for row in one["rows"]]
        for row, ref, replicated in zip(result["rows"], one["rows"], result["replicated"]):
            assert row["tokens"] == ref["tokens"] == 8 * 9
            for name in METRIC_NAMES:
                # the same statistics all-reduced and decomposed on every rank: equal to round-off
                assert row[name] == pytest.approx(replicated[name], rel=1e-12, abs=1e-15, nan_ok=True), (rank, name)
                # one process on the same tokens (a float64 model): equal to float64 round-off of the sums
                assert row[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12, nan_ok=True), (rank, name)
        if metrics == "all":
            assert result["eigenvalues"].keys() == one["eigenvalues"].keys()
            for site, (pre, post) in result["eigenvalues"].items():
                reference_pre, reference_post = one["eigenvalues"][site]
                assert pre == pytest.approx(reference_pre, rel=1e-9, abs=1e-12 * max(reference_pre))
                assert post == pytest.approx(reference_post, rel=1e-9, abs=1e-12 * max(reference_post))
            # this rank's eigvalsh calls covered exactly its own sites' pre and post matrices
            assert sum(result["decomposed"]) == 2 * owners.count(rank)
        else:
            assert result["decomposed"] == []
        expected = exchange_bytes([D] * n_layer, nproc, metrics)
        assert result["sent"] == {
            "all_reduce": expected["totals"],
            "reduce_scatter": expected["reduce_scatter"],
            "reduce": expected["reduce"],
            "all_gather": expected["all_gather"],
        }
    assert sum(one["decomposed"]) == (2 * n_layer if metrics == "all" else 0)  # one process: every matrix


@pytest.mark.distributed
def test_site_sharded_processes_measure_their_own_ffns_on_their_own_tokens(tmp_path):
    """3 FFNs over 2 processes: each keeps state for its own (in host memory), counts only its tokens,
    and every process ends with all three rows; the budget counts only the FFNs a process owns
    (0.05 MiB holds two FFNs of width 37, not three)."""
    torchrun("site_sharded.py", str(tmp_path), nproc=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    owners = assign_owners([D] * 3, 2, power=2)
    assert [r["owned"] for r in results] == [[i for i in range(3) if owners[i] == rank] for rank in range(2)]
    assert all(r["devices"] == ["cpu"] for r in results)
    for result in results:
        assert [row["site"] for row in result["rows"]] == ["ffn.0", "ffn.1", "ffn.2"]
        for i, row in enumerate(result["rows"]):
            owner = results[owners[i]]["local"][i]  # the owner's own measurement of that FFN
            assert row["tokens"] == owner["tokens"] == 4 * 9  # a per-site subsample: the owner's tokens only
            for name in METRIC_NAMES:
                assert row[name] == pytest.approx(owner[name], rel=1e-12, abs=1e-15), (i, name)
        # flow and position buckets: every process reports every FFN's, as its owner measured them
        more = result["more"]
        assert set(FLOW_KEYS) <= set(more["rows"][0]) and len(more["positions"]) == 3 * 2
        assert [p["tokens"] for p in more["positions"]] == [4 * 4, 4 * 5] * 3  # the owner's tokens, by position
        for i, row in enumerate(more["rows"]):
            owner = results[owners[i]]["local_more"]
            for name in (*METRIC_NAMES, *FLOW_KEYS):
                assert row[name] == pytest.approx(owner["rows"][i][name], rel=1e-12, abs=1e-15), (i, name)
            assert np.allclose(more["flow_spectra"][row["site"]], owner["flow_spectra"][row["site"]], 1e-12, 1e-15)
            for b in range(2):
                got, want = more["positions"][2 * i + b], owner["positions"][2 * i + b]
                assert (got["site"], got["bucket"], got["tokens"]) == (want["site"], want["bucket"], want["tokens"])
                for name in METRIC_NAMES:
                    assert got[name] == pytest.approx(want[name], rel=1e-12, abs=1e-15), (i, b, name)
                key = f"{got['site']}/{got['bucket']}"
                assert np.allclose(more["bucket_spectra"][key], owner["bucket_spectra"][key], 1e-12, 1e-15)
