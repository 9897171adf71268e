"""CovarianceAccumulator.update against the bare GEMM x.T @ x of the same rows (the hardware limit).

For each width D, input dtype and device, the two are timed in alternating rounds with
``torch.utils.benchmark.Timer.blocked_autorange`` (so load on a shared machine hits both alike); the
reported ratio is the median over rounds of bare_time / ours_time (1.0: as fast as the bare GEMM;
target >= 0.8). On the CPU the accumulator multiplies only the upper block triangle of the symmetric
scatter (about half the FLOPs), so there it can beat the full GEMM (ratio above 1).

What "the bare GEMM" is for each input:

* fp32: ``x.T @ x`` in fp32. On CUDA both sides run with TF32 off (our path forces IEEE fp32; the
  bare side is run under the same setting, which is also PyTorch's default).
* bf16: our path converts the rows to fp32 while centring them and multiplies in IEEE fp32: centred
  in bf16, x − s keeps 8 bits and the covariance is off by ~5e-4; in fp32 it is good to ~1e-7. The
  floor of that exact computation is an fp32 ``x.T @ x`` of the already-converted rows (conversion not
  timed), which is the headline ``ratio``. The rows also report ``ratio_vs_bare``: against
  ``x.T @ x`` on the bf16 tensor itself, i.e. what the hardware does for that input (CUDA: tensor-core
  bf16 GEMM with fp32 accumulation, 10-15x faster than fp32 on an H100; CPU: oneDNN/MKL bf16 GEMM, fast
  only on CPUs with AVX512-BF16/AMX), which exactness gives up. On CUDA our path multiplies the
  fp32-centred rows by the three-part bf16 split of :func:`nerve_hf.stats.kernels.split_gram` (four
  tensor-core GEMMs, fp32-class error), so there ``ratio_vs_bare`` is at most about 1/4 and
  ``ratio`` (against the IEEE fp32 GEMM) can exceed 1.

Run: ``python benchmarks/perf/accumulator_throughput.py --device auto [--quick]``
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from pathlib import Path

import torch
from _common import add_common_args, apply_threads, devices, synchronize, write_result
from torch.utils.benchmark import Timer

import nerve_hf.stats.covariance
from nerve_hf.stats.covariance import exact_fp32_matmul

WIDTHS = (512, 1024, 3072)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rows_for(device: torch.device, dim: int, quick: bool) -> int:
    """Enough rows that the GEMM dominates (~0.1-1 s on 2 CPU cores; ~1 ms+ on a GPU)."""
    if device.type == "cuda":
        return 16384 if quick else 65536
    if quick:
        return 4096 if dim <= 1024 else 2048
    return 16384 if dim <= 1024 else 4096


def timed(stmt: str, env: dict, min_run_time: float) -> float:
    """Median seconds per call of ``stmt`` (blocked_autorange synchronises CUDA itself)."""
    return (
        Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads())
        .blocked_autorange(min_run_time=min_run_time)
        .median
    )


def load_accumulator(path: Path | None):
    """CovarianceAccumulator from this checkout, or from another version of covariance.py."""
    if path is None:
        return nerve_hf.stats.covariance.CovarianceAccumulator
    spec = importlib.util.spec_from_file_location("nerve_hf._covariance_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its `from .distributed import ...` resolves inside nerve_hf
    return module.CovarianceAccumulator


def bench_one(device: torch.device, dim: int, dtype_name: str, quick: bool, accumulator=None) -> dict:
    dtype = DTYPES[dtype_name]
    n = rows_for(device, dim, quick)
    generator = torch.Generator(device=device).manual_seed(dim)
    # Activations-like rows: a non-zero mean and correlated columns.
    x = (0.5 + torch.randn(n, dim, device=device, generator=generator)).to(dtype)  # [N, D]
    x32 = x.float()  # the rows our path multiplies for bf16 input
    acc = (accumulator or nerve_hf.stats.covariance.CovarianceAccumulator)(dim, device=device)
    acc.update(x)  # allocate state, warm up kernels
    env = {"acc": acc, "x": x, "x32": x32, "exact_fp32_matmul": exact_fp32_matmul, "device": device}
    candidates = {"ours": "acc.update(x)", "bare": "with exact_fp32_matmul(device):\n    x.T @ x"}
    if dtype != torch.float32:
        candidates["bare_fp32_of_upcast"] = "with exact_fp32_matmul(device):\n    x32.T @ x32"
    for stmt in candidates.values():  # warm-up
        exec(stmt, env)
    synchronize(device)

    rounds = 3 if quick else 7
    min_run_time = 0.2 if quick else 0.6
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for r in range(rounds):
        order = list(candidates) if r % 2 == 0 else list(reversed(candidates))  # ABBA
        for name in order:
            times[name].append(timed(candidates[name], env, min_run_time))
    flops = 2.0 * n * dim * dim
    result = {
        "dim": dim,
        "rows": n,
        "dtype": dtype_name,
        "rounds": rounds,
        "median_s": {name: statistics.median(ts) for name, ts in times.items()},
        "all_s": times,
        "ours_gflops": flops / statistics.median(times["ours"]) / 1e9,
        "bare_gflops": flops / statistics.median(times["bare"]) / 1e9,
    }
    # Per-round ratios (same round, adjacent in time), median over rounds.
    result["ratio_vs_bare"] = statistics.median(b / o for b, o in zip(times["bare"], times["ours"]))
    reference = "bare"
    if "bare_fp32_of_upcast" in times:
        result["ratio_vs_bare_fp32_of_upcast"] = statistics.median(
            b / o for b, o in zip(times["bare_fp32_of_upcast"], times["ours"])
        )
        reference = "bare_fp32_of_upcast"
    result["reference"] = reference  # the GEMM of the exact computation, which `ratio` is against
    result["ratio"] = result["ratio_vs_bare"] if reference == "bare" else result["ratio_vs_bare_fp32_of_upcast"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="FFN widths D to measure")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="input dtypes")
    parser.add_argument(
        "--impl",
        type=Path,
        default=None,
        help="time the CovarianceAccumulator of this covariance.py instead (e.g. an older version from "
        "`git show REV:nerve_hf/covariance.py > old.py`); results go to accumulator_throughput_impl-<stem>_*.json",
    )
    args = parser.parse_args()
    apply_threads(args.threads)
    accumulator = load_accumulator(args.impl)
    name = "accumulator_throughput" if args.impl is None else f"accumulator_throughput_impl-{args.impl.stem}"
    for device in devices(args.device):
        rows = []
        for dim in args.widths:
            for dtype_name in args.dtypes:
                row = bench_one(device, dim, dtype_name, args.quick, accumulator)
                rows.append(row)
                print(
                    f"{device.type:>4} D={dim:<5} N={row['rows']:<6} {dtype_name}: "
                    f"ours {row['median_s']['ours'] * 1e3:8.2f} ms"
                    f"  bare {row['median_s']['bare'] * 1e3:8.2f} ms"
                    + (
                        f"  bare fp32 of upcast {row['median_s']['bare_fp32_of_upcast'] * 1e3:8.2f} ms"
                        if "bare_fp32_of_upcast" in row["median_s"]
                        else ""
                    )
                    + f"  ratio {row['ratio']:.2f} (vs {row['reference']})",
                    flush=True,
                )
        payload = {
            "target_ratio": 0.8,
            "impl": str(args.impl) if args.impl else "nerve_hf.stats.covariance",
            "results": rows,
        }
        write_result(args.out, name, device, payload, args.quick)


if __name__ == "__main__":
    main()
