"""CovarianceAccumulator against a one-shot float64 two-pass covariance."""

import warnings

import numpy as np
import pytest
import torch
from distributed_helpers import torchrun
from reference import rel_err, two_pass

from nerve_hf.metrics import participation_ratio
from nerve_hf.spectra import eigenvalues_batched, participation_ratio_from_covariance
from nerve_hf.stats import kernels
from nerve_hf.stats.covariance import CovarianceAccumulator, sync_accumulators


def test_chunked_fp32_with_large_offset_matches_two_pass():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(37, 37, generator=generator)
    rows = (1e4 + 1e-2 * torch.randn(5000, 37, generator=generator) @ mixing).float()  # [N, 37] fp32
    acc = CovarianceAccumulator(37)
    for chunk in rows.split(333):  # uneven last chunk
        acc.update(chunk)
    assert acc.count == 5000 and acc.skipped == 0
    assert rel_err(acc.covariance(), two_pass(rows)) < 1e-6
    np.testing.assert_allclose(acc.mean().numpy(), rows.double().mean(0).numpy(), rtol=1e-12)


def test_naive_fp32_moments_would_fail_this_data():
    """The data of the test above really does defeat Σxxᵀ − nμμᵀ in fp32 (the test can fail)."""
    generator = torch.Generator().manual_seed(0)
    rows = (1e4 + 1e-2 * torch.randn(5000, 37, generator=generator)).float()
    n = rows.shape[0]
    mean = rows.mean(0)
    naive = (rows.T @ rows - n * torch.outer(mean, mean)) / (n - 1)
    assert rel_err(naive.double(), two_pass(rows)) > 1.0


def test_update_shapes_and_mask():
    torch.manual_seed(1)
    x = torch.randn(3, 11, 19, dtype=torch.float64)  # [batch, seq, D]
    mask = torch.rand(3, 11) > 0.4
    acc = CovarianceAccumulator(19)
    acc.update(x, mask=mask)
    assert acc.count == int(mask.sum())
    assert rel_err(acc.covariance(), two_pass(x[mask])) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_precisions_agree_with_float64_of_same_values(dtype):
    torch.manual_seed(2)
    rows = (3.0 + torch.randn(2000, 29) * torch.linspace(0.1, 2, 29)).to(dtype)
    acc = CovarianceAccumulator(29)
    for chunk in rows.split(512):
        acc.update(chunk)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(acc.covariance(), two_pass(rows)) < tolerance
    assert acc.covariance().dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_blocked_upper_triangle_product_over_chunks_matches_two_pass(monkeypatch, dtype):
    """The CPU scatter is built from its upper block triangle, chunk by chunk, then mirrored."""
    monkeypatch.setattr(kernels, "_CPU_GRAM_BLOCK", 8)  # 37 columns: blocks of 9, 9, 9 and 10
    monkeypatch.setattr(kernels, "_CPU_CHUNK_ELEMENTS", 300 * 37)  # 1000 rows: chunks of 300, 300, 300, 100
    monkeypatch.setattr(kernels, "_MIN_CHUNK_ROWS", 1)
    assert kernels._gram_block_edges(37, torch.device("cpu")) == [0, 9, 18, 27, 37]
    generator = torch.Generator().manual_seed(4)
    rows = (5.0 + torch.randn(1000, 37, generator=generator) @ torch.randn(37, 37, generator=generator)).to(dtype)
    _, _, scatter = kernels.shifted_moments(rows)
    assert torch.equal(scatter[9:, :9], scatter[:9, 9:].T)  # mirrored, not computed twice
    acc = CovarianceAccumulator(37)
    acc.update(rows)
    assert rel_err(acc.covariance(), two_pass(rows)) < (1e-13 if dtype == torch.float64 else 1e-6)


def test_upper_gram_first_chunk_ignores_what_the_buffer_held():
    generator = torch.Generator().manual_seed(5)
    centred = torch.randn(50, 20, generator=generator)  # [R, D]
    scatter = torch.full((20, 20), float("nan"))  # torch.empty may hold anything
    edges = [0, 6, 13, 20]
    kernels._add_upper_gram(scatter, centred, edges, first=True)
    kernels._mirror_upper(scatter, edges)
    torch.testing.assert_close(scatter, centred.T @ centred, rtol=1e-5, atol=1e-5)
    kernels._add_upper_gram(scatter, centred, edges, first=False)  # a second chunk adds
    kernels._mirror_upper(scatter, edges)
    torch.testing.assert_close(scatter, 2 * centred.T @ centred, rtol=1e-5, atol=1e-5)


def test_gram_blocks_only_on_the_cpu():
    assert kernels._gram_block_edges(512, torch.device("cpu")) == [0, 128, 256, 384, 512]
    assert len(kernels._gram_block_edges(11008, torch.device("cpu"))) == 17  # at most 16 blocks
    assert kernels._gram_block_edges(100, torch.device("cpu")) == [0, 100]
    assert kernels._gram_block_edges(512, torch.device("meta")) == [0, 512]  # accelerators: one GEMM


def test_nonfinite_rows_skipped_counted_warned_once():
    torch.manual_seed(3)
    rows = torch.randn(100, 13)
    rows[5, 2] = float("nan")
    rows[50, 0] = float("inf")
    rows[51, 12] = -float("inf")
    acc = CovarianceAccumulator(13)
    with pytest.warns(RuntimeWarning, match="skipped 1 of 50 rows") as record:
        acc.update(rows[:50])  # 1 bad row here
        acc.update(rows[50:])  # 2 bad rows here: counted, no second warning
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    good = torch.isfinite(rows).all(1)
    assert acc.skipped == 3 and acc.count == 97
    assert rel_err(acc.covariance(), two_pass(rows[good])) < 1e-6


def test_first_warning_message_counts_its_own_batch():
    acc = CovarianceAccumulator(2)
    with pytest.warns(RuntimeWarning, match="skipped 2 of 3 rows"):
        acc.update(torch.tensor([[1.0, float("nan")], [float("inf"), 0.0], [1.0, 2.0]]))
    assert acc.count == 1 and torch.isnan(acc.covariance()).all()


def test_all_nonfinite_batch_leaves_state_empty():
    acc = CovarianceAccumulator(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc.update(torch.full((6, 4), float("nan")))
    assert acc.count == 0 and acc.skipped == 6
    assert torch.isnan(acc.mean()).all() and torch.isnan(acc.eigenvalues()).all()


def test_wrong_width_and_dtype_raise():
    acc = CovarianceAccumulator(8)
    with pytest.raises(ValueError, match=r"width 8.*last dimension 9"):
        acc.update(torch.zeros(4, 9))
    with pytest.raises(ValueError, match="mask shape"):
        acc.update(torch.zeros(4, 8), mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating point"):
        acc.update(torch.zeros(4, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="positive"):
        CovarianceAccumulator(0)
    assert acc.count == 0


def test_merge_equals_single_stream():
    torch.manual_seed(4)
    a_rows = torch.randn(70, 10, dtype=torch.float64) + 5
    b_rows = torch.randn(31, 10, dtype=torch.float64) * 3 - 2
    a, b, whole = CovarianceAccumulator(10), CovarianceAccumulator(10), CovarianceAccumulator(10)
    a.update(a_rows)
    b.update(b_rows)
    whole.update(torch.cat([a_rows, b_rows]))
    a.merge(b)
    assert a.count == 101
    torch.testing.assert_close(a.covariance(), whole.covariance(), rtol=1e-10, atol=1e-12)
    empty = CovarianceAccumulator(10)
    empty.merge(a)
    torch.testing.assert_close(empty.covariance(), whole.covariance(), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="different widths"):
        a.merge(CovarianceAccumulator(3))


def test_state_dict_round_trip_and_reset():
    torch.manual_seed(5)
    rows = torch.randn(40, 6, dtype=torch.float64)
    acc = CovarianceAccumulator(6)
    acc.update(rows[:25])
    restored = CovarianceAccumulator(6)
    restored.load_state_dict(acc.state_dict())
    restored.update(rows[25:])
    assert restored.count == 40
    assert rel_err(restored.covariance(), two_pass(rows)) < 1e-12
    restored.reset()
    assert restored.count == 0 and torch.isnan(restored.covariance()).all()
    with pytest.raises(ValueError, match="dim=6"):
        CovarianceAccumulator(7).load_state_dict(acc.state_dict())


def test_eigenvalues_descending_and_batched():
    torch.manual_seed(6)
    covs = []
    for dim in (5, 5, 8):
        m = torch.randn(dim, dim, dtype=torch.float64)
        covs.append(m @ m.T)
    covs.insert(1, torch.full((5, 5), float("nan"), dtype=torch.float64))
    spectra = eigenvalues_batched(covs)
    assert torch.isnan(spectra[1]).all()
    for cov, spectrum in zip(covs[:1] + covs[2:], spectra[:1] + spectra[2:]):
        ref = np.sort(np.linalg.eigvalsh(cov.numpy()))[::-1]
        np.testing.assert_allclose(spectrum.numpy(), ref, rtol=1e-10, atol=1e-10)
        assert (spectrum[:-1] >= spectrum[1:]).all()
        pr_trace = participation_ratio_from_covariance(cov).item()
        assert pr_trace == pytest.approx(participation_ratio(spectrum).item(), rel=1e-10)
    assert torch.isnan(participation_ratio_from_covariance(torch.zeros(3, 3)))


@pytest.fixture
def three_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_eigenvalues_spread_over_threads_on_the_cpu(three_torch_threads, monkeypatch):
    torch.manual_seed(7)
    covs = []
    for _ in range(5):  # 3 threads, 5 matrices: workers decompose 2, 2 and 1
        m = torch.randn(40, 33, dtype=torch.float64)
        covs.append(m.T @ m)
    seen = []  # (thread name, threads it used, matrices) per eigvalsh call
    real = torch.linalg.eigvalsh

    def recording(stack):
        seen.append((__import__("threading").current_thread().name, torch.get_num_threads(), stack.shape[0]))
        return real(stack)

    monkeypatch.setattr(torch.linalg, "eigvalsh", recording)
    spectra = eigenvalues_batched(covs)
    assert sorted(count for _, _, count in seen) == [1, 2, 2]
    assert all(name.startswith("nerve-eigvalsh") and threads == 1 for name, threads, _ in seen)
    assert torch.get_num_threads() == 3  # restored
    for cov, spectrum in zip(covs, spectra):
        ref = np.sort(np.linalg.eigvalsh(cov.numpy()))[::-1]
        np.testing.assert_allclose(spectrum.numpy(), ref, rtol=1e-12, atol=1e-12 * ref[0])

    def failing(stack):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", failing)
    with pytest.raises(torch.linalg.LinAlgError, match="did not converge"):
        eigenvalues_batched(covs)
    assert torch.get_num_threads() == 3  # restored after an error too


def test_single_process_sync_is_a_no_op():
    acc = CovarianceAccumulator(3)
    acc.update(torch.randn(10, 3))
    before = acc.covariance()
    acc.sync()
    sync_accumulators([acc])
    assert acc.count == 10
    torch.testing.assert_close(acc.covariance(), before, rtol=0, atol=0)


@pytest.mark.distributed
def test_two_processes_gloo_sync_exact(tmp_path):
    out = tmp_path / "synced.pt"
    torchrun("covariance_sync.py", str(out))
    result = torch.load(out)
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(1001, 23, generator=generator, dtype=torch.float64) * 0.5 + 7.0
    wide = torch.randn(640, 40, generator=generator)
    assert result["world"] == 2
    assert result["count"] == 1001
    assert rel_err(result["cov"], two_pass(rows)) < 1e-10
    np.testing.assert_allclose(result["mean"].numpy(), rows.mean(0).numpy(), rtol=1e-13)
    assert result["count_wide"] == 640
    assert rel_err(result["cov_wide"], two_pass(wide)) < 1e-6
    assert result["empty_count"] == 0 and result["empty_eig_nan"]
    assert result["local_count_kept"]


# ------------------------------------------------------------------- load_state_dict validation
def loaded_accumulator() -> CovarianceAccumulator:
    acc = CovarianceAccumulator(37)
    acc.update(torch.randn(50, 37, generator=torch.Generator().manual_seed(8), dtype=torch.float64))
    acc._skipped = 2
    return acc


def assert_same_state(acc: CovarianceAccumulator, before: dict) -> None:
    after = acc.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value, key


def test_state_dict_round_trip_is_exact():
    acc = loaded_accumulator()
    state = acc.state_dict()
    restored = CovarianceAccumulator(37)
    restored.load_state_dict(state)
    assert_same_state(restored, state)
    assert restored.count == 50 and restored.skipped == 2
    assert torch.equal(restored.covariance(), acc.covariance())
    empty = CovarianceAccumulator(37)
    empty.load_state_dict(CovarianceAccumulator(37).state_dict())  # an empty state loads as empty
    assert empty.count == 0 and torch.isnan(empty.mean()).all()


@pytest.mark.parametrize("key", ["dim", "count", "skipped", "mean", "m2"])
def test_load_state_dict_names_a_missing_key(key):
    acc = loaded_accumulator()
    before = acc.state_dict()
    state = acc.state_dict()
    del state[key]
    with pytest.raises(ValueError, match=rf"^CovarianceAccumulator\.load_state_dict: .*'{key}'.*\.$"):
        acc.load_state_dict(state)
    assert_same_state(acc, before)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("m2", (1, 37)),  # broadcast silently before
        ("m2", (37,)),
        ("m2", (36, 36)),  # a raw torch size error before
        ("m2", (37, 37, 1)),
        ("mean", (1,)),
        ("mean", (1, 37)),
        ("mean", (38,)),
    ],
)
def test_load_state_dict_rejects_wrong_shapes_naming_both(key, shape):
    acc = loaded_accumulator()
    before = acc.state_dict()
    state = acc.state_dict()
    state[key] = torch.ones(shape, dtype=torch.float64)
    expected = (37,) if key == "mean" else (37, 37)
    message = f"CovarianceAccumulator.load_state_dict: state['{key}'] has shape {shape}, expected {expected}."
    with pytest.raises(ValueError) as error:
        acc.load_state_dict(state)
    assert str(error.value) == message
    assert_same_state(acc, before)


@pytest.mark.parametrize(
    "key, value",
    [
        ("count", -1),
        ("skipped", -3),
        ("count", True),
        ("skipped", False),
        ("count", 2.5),
        ("count", float("nan")),
        ("count", "50"),
        ("skipped", None),
        ("count", torch.tensor(-1)),
        ("count", torch.tensor([50])),
        ("dim", 37.5),
    ],
)
def test_load_state_dict_rejects_bad_counts(key, value):
    acc = loaded_accumulator()
    before = acc.state_dict()
    state = acc.state_dict()
    state[key] = value
    with pytest.raises(ValueError, match=rf"^CovarianceAccumulator\.load_state_dict: state\['{key}'\] .*\.$"):
        acc.load_state_dict(state)
    assert_same_state(acc, before)


@pytest.mark.parametrize("count", [np.int64(50), torch.tensor(50), 50.0, np.float32(50.0), torch.tensor(50.0)])
def test_load_state_dict_accepts_integer_scalars(count):
    acc = loaded_accumulator()
    state = acc.state_dict()
    state["count"], state["skipped"], state["dim"] = count, np.int32(2), torch.tensor(37)
    restored = CovarianceAccumulator(37)
    restored.load_state_dict(state)
    assert restored.count == 50 and type(restored.count) is int
    assert restored.skipped == 2 and type(restored.skipped) is int
    assert torch.equal(restored.covariance(), acc.covariance())


def test_load_state_dict_rejects_other_dim_types_and_nonfinite():
    acc = loaded_accumulator()
    before = acc.state_dict()
    with pytest.raises(ValueError, match=r"^CovarianceAccumulator\.load_state_dict: .*dim=6.*dim=37.*\.$"):
        acc.load_state_dict({**before, "dim": 6})
    for key in ("mean", "m2"):
        with pytest.raises(ValueError, match=rf"state\['{key}'\] .*floating"):
            acc.load_state_dict({**before, key: before[key].to(torch.int64)})
        with pytest.raises(ValueError, match=rf"state\['{key}'\] must be a tensor"):
            acc.load_state_dict({**before, key: before[key].tolist()})
        for bad in (float("nan"), float("inf")):
            value = before[key].clone()
            value.view(-1)[3] = bad
            with pytest.raises(ValueError, match=rf"^CovarianceAccumulator\.load_state_dict: state\['{key}'\] .*NaN"):
                acc.load_state_dict({**before, key: value})
    assert_same_state(acc, before)
    # With count 0 the moments are unused (state_dict() writes zeros): their values are not checked.
    empty = CovarianceAccumulator(37)
    empty.load_state_dict({**before, "count": 0, "mean": torch.full((37,), float("nan"), dtype=torch.float64)})
    assert empty.count == 0 and empty.skipped == 2
    float32 = CovarianceAccumulator(37)  # any floating dtype, converted to the float64 state
    float32.load_state_dict({**before, "mean": before["mean"].float(), "m2": before["m2"].float()})
    assert float32.count == 50 and float32.covariance().dtype == torch.float64
