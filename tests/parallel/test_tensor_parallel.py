"""Tensor-parallel MLPs on real gloo processes: the tracker gathers the column slices and reports the
full-width spectrum of the unsharded model, never a slice's."""

import json

import pytest
from distributed_helpers import torchrun

from nerve_hf.metrics import METRIC_NAMES

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    "nproc,intermediate,how",
    [(2, 38, "parallelize_module"), (4, 44, "parallelize_module"), (2, 38, "tp_plan")],  # shards of 19, 11, 19
)
def test_tensor_parallel_mlp_equals_the_unsharded_model(tmp_path, nproc, intermediate, how):
    torchrun("tensor_parallel.py", str(tmp_path), str(intermediate), how, nproc=nproc)
    for rank in range(nproc):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        reference, sharded = result["reference"], result["sharded"]
        assert [r["site"] for r in sharded] == [r["site"] for r in reference] == ["ffn.0", "ffn.1"]
        for got, want in zip(sharded, reference):
            assert got["dim"] == want["dim"] == intermediate  # the full width, not intermediate / nproc
            assert got["tokens"] == want["tokens"] == 3 * 9 - 3  # padding excluded, tokens not summed over ranks
            for name in METRIC_NAMES:
                assert got[name] == pytest.approx(want[name], rel=1e-10, abs=1e-13), (rank, got["site"], name)
