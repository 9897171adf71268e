"""StreamingMoments: a new kind of accumulator needs only its layout and its batch moments, and every kind
is reduced by the one base sync (two packed all-reduces for any number and mix of accumulators)."""

import threading

import numpy as np
import pytest
import torch
from reference import rel_err, two_pass

from nerve_hf.parallel import comm
from nerve_hf.stats.covariance import CovarianceAccumulator, sync_accumulators
from nerve_hf.stats.cross_covariance import CrossCovarianceAccumulator, sync_cross_accumulators
from nerve_hf.stats.moments import MomentsLayout, StreamingMoments, sync_moments


class TransposedCross(StreamingMoments):
    """Σ (y − μ_y)(x − μ_x)ᵀ ``[d_y, d_x]`` by a float64 two-pass per batch: a layout and batch moments only."""

    LAYOUT = MomentsLayout(widths=("dim_x", "dim_y"), means=("mean_x", "mean_y"), moment="yx", moment_of=(1, 0))

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()  # [N, d_x], [N, d_y]
        mean_x, mean_y = x.mean(0), y.mean(0)
        self._merge_moments(x.shape[0], (mean_x, mean_y), (y - mean_y).T @ (x - mean_x))


def streams(n=203, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 5.0 + torch.randn(n, 6, generator=generator, dtype=torch.float64)  # [N, 6]
    y = -2.0 + x[:, :4] @ torch.randn(4, 4, generator=generator, dtype=torch.float64)  # [N, 4]
    return x, y


def centred_cross(x, y) -> np.ndarray:
    """Reference Σ (x − μ_x)(y − μ_y)ᵀ in float64 NumPy."""
    x, y = x.double().numpy(), y.double().numpy()
    return (x - x.mean(0)).T @ (y - y.mean(0))


def test_a_new_kind_needs_only_its_layout_and_batch_moments():
    x, y = streams()
    left, right = TransposedCross((6, 4)), TransposedCross((6, 4))
    for start in range(0, 150, 41):
        left.update(x[start : min(start + 41, 150)], y[start : min(start + 41, 150)])
    right.update(x[150:], y[150:])
    merged = left.merge(right)  # the base's Chan merge
    moments = merged.moments()
    assert (moments.count, moments.skipped, merged.m2_shape) == (203, 0, (4, 6))
    np.testing.assert_allclose(moments.m2.numpy(), centred_cross(x, y).T, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(moments.means[1].numpy(), y.mean(0).numpy(), rtol=1e-13)

    state = merged.state_dict()  # the base's persistence, keys from the layout
    assert sorted(state) == ["count", "dim_x", "dim_y", "mean_x", "mean_y", "skipped", "yx"]
    restored = TransposedCross((6, 4))
    restored.load_state_dict(state)
    assert torch.equal(restored.moments().m2, moments.m2) and restored.moments().count == 203
    bad = dict(state, yx=state["yx"].T)
    with pytest.raises(ValueError, match=r"^TransposedCross\.load_state_dict: state\['yx'\] has shape \(6, 4\)"):
        restored.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"^TransposedCross\.load_state_dict: .*widths \(6, 4\).*\(6, 5\)"):
        TransposedCross((6, 5)).load_state_dict(state)
    with pytest.raises(ValueError, match="cannot merge CrossCovarianceAccumulator"):
        restored.merge(CrossCovarianceAccumulator(6, 4))
    restored.reset()
    assert restored.moments().count == 0 and restored.moments().m2 is None


def test_subclasses_share_the_merge_and_state_of_the_base():
    x, y = streams(seed=1)
    cross, transposed, cov = CrossCovarianceAccumulator(6, 4), TransposedCross((6, 4)), CovarianceAccumulator(6)
    for start in range(0, 203, 50):
        cross.update(x[start : start + 50], y[start : start + 50])
        transposed.update(x[start : start + 50], y[start : start + 50])
        cov.update(x[start : start + 50])
    np.testing.assert_allclose(transposed.moments().m2.T.numpy(), cross.scatter().numpy(), rtol=1e-12, atol=1e-10)
    for acc in (cross, cov):
        assert isinstance(acc, StreamingMoments)
        assert type(acc).merge is not StreamingMoments.merge  # a width check in front of ...
        assert type(acc).state_dict is StreamingMoments.state_dict  # ... the base's own machinery
        assert type(acc).load_state_dict is StreamingMoments.load_state_dict
        assert type(acc).sync is StreamingMoments.sync
        assert type(acc)._merge_moments is StreamingMoments._merge_moments


class ThreadRanks:
    """``world`` threads standing in for processes: all_reduce_sum sums the threads' tensors in rank order."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier, self.local = world, threading.Barrier(world), threading.local()
        self.slots = [None] * world  # each rank's tensor of the all-reduce under way
        self.calls = [0] * world  # all-reduces per rank

    def all_reduce_sum(self, tensor, group=None):
        rank = self.local.rank
        self.calls[rank] += 1
        self.slots[rank] = tensor
        self.barrier.wait()
        total = sum(slot.clone() for slot in self.slots)  # the same order, so the same bits, on every rank
        self.barrier.wait()  # every rank has read every slot before any is overwritten
        return tensor.copy_(total)

    def run(self, work):
        results, errors = [None] * self.world, []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as error:  # noqa: BLE001 - reported in the main thread
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def two_ranks(monkeypatch):
    ranks = ThreadRanks(2)
    monkeypatch.setattr(comm, "is_distributed", lambda group=None: True)
    monkeypatch.setattr(comm, "all_reduce_sum", ranks.all_reduce_sum)
    return ranks


def test_every_kind_syncs_through_one_base_sync(two_ranks):
    """One sync_moments of covariances, cross-covariances and a new kind, mixed: two all-reduces in all, and
    each accumulator ends with the moments of one process that saw every row."""
    x, y = streams(n=301, seed=2)
    bounds = [0, 88, 301]  # uneven shares

    def work(rank):
        rows = slice(bounds[rank], bounds[rank + 1])
        accs = [CovarianceAccumulator(6), CrossCovarianceAccumulator(6, 4), TransposedCross((6, 4))]
        accs.append(CovarianceAccumulator(3))  # no rows on any rank
        for start in range(rows.start, rows.stop, 40):
            part = slice(start, min(start + 40, rows.stop))
            accs[0].update(x[part])
            accs[1].update(x[part], y[part])
            accs[2].update(x[part], y[part])
        local = [acc.state_dict() for acc in accs]
        sync_moments(accs)
        sync_moments(accs)  # again: nothing is counted twice
        for acc, before in zip(accs, local):  # this process's own statistics stay as they were
            after = acc.state_dict()
            assert all(torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v for k, v in before.items())
        return accs

    for cov, cross, transposed, empty in two_ranks.run(work):
        assert cov.count == cross.count == transposed.moments().count == 301
        assert rel_err(cov.covariance(), two_pass(x)) < 1e-13
        np.testing.assert_allclose(cross.scatter().numpy(), centred_cross(x, y), rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(transposed.moments().m2.T.numpy(), centred_cross(x, y), rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(cross.mean()[1].numpy(), y.mean(0).numpy(), rtol=1e-13)
        assert empty.count == 0 and torch.isnan(empty.covariance()).all()
    assert two_ranks.calls == [4, 4]  # two syncs, two packed all-reduces each, whatever the accumulators


def test_the_named_syncs_are_the_base_sync(two_ranks):
    x, y = streams(n=120, seed=3)

    def work(rank):
        covs = [CovarianceAccumulator(6), CovarianceAccumulator(4)]
        cross = CrossCovarianceAccumulator(6, 4)
        covs[0].update(x[rank::2])
        covs[1].update(y[rank::2])
        cross.update(x[rank::2], y[rank::2])
        sync_accumulators(covs)
        sync_cross_accumulators([cross])
        cross.sync()
        return covs, cross

    for (cov_x, cov_y), cross in two_ranks.run(work):
        assert rel_err(cov_x.covariance(), two_pass(x)) < 1e-13 and rel_err(cov_y.covariance(), two_pass(y)) < 1e-13
        np.testing.assert_allclose(cross.scatter().numpy(), centred_cross(x, y), rtol=1e-12, atol=1e-10)
    assert two_ranks.calls == [6, 6]


def test_sync_is_a_no_op_on_one_process():
    acc = TransposedCross((2, 2))
    acc.update(torch.randn(5, 2), torch.randn(5, 2))
    before = acc.moments()
    sync_moments([acc])
    assert acc.moments() is not None and torch.equal(acc.moments().m2, before.m2)
