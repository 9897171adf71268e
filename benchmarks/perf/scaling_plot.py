"""Cost against width D and against tokens N, with fitted growth exponents, as a PNG and JSON.

Three curves per device, each timed with ``torch.utils.benchmark.Timer.blocked_autorange``:

* ``update vs D``: ``CovarianceAccumulator.update`` of N fixed rows (fp32) for growing D: expect ~D².
* ``update vs N``: the same for fixed D and growing N: expect ~N (memory stays D², whatever N).
* ``eigvalsh vs D``: one float64 eigendecomposition (what compute() does per FFN side): expect ~D³.

The exponent is the slope of ``numpy.polyfit`` on log(time) vs log(size) over the largest sizes
(small sizes are dominated by fixed costs); it is printed, written to the JSON and shown in the legend.

Run: ``python benchmarks/perf/scaling_plot.py --device auto [--quick]``
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _common import add_common_args, apply_threads, device_label, devices, write_result
from torch.utils.benchmark import Timer

from nerve_hf.stats.covariance import CovarianceAccumulator

FIT_POINTS = 3  # the exponent is fitted over this many largest sizes


def seconds(stmt: str, env: dict, budget: float) -> float:
    return Timer(stmt, globals=env, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=budget).median


def update_time(device: torch.device, n: int, dim: int, budget: float) -> float:
    x = torch.randn(n, dim, device=device) + 1.0
    acc = CovarianceAccumulator(dim, device=device)
    acc.update(x)
    return seconds("acc.update(x)", {"acc": acc, "x": x}, budget)


def eig_time(device: torch.device, dim: int, budget: float) -> float:
    a = torch.randn(dim, 2 * dim, dtype=torch.float64, device=device)
    cov = a @ a.T / (2 * dim)
    torch.linalg.eigvalsh(cov)
    return seconds("torch.linalg.eigvalsh(cov)", {"torch": torch, "cov": cov}, budget)


def fit(sizes: list[int], times: list[float]) -> float:
    slope, _ = np.polyfit(np.log(sizes[-FIT_POINTS:]), np.log(times[-FIT_POINTS:]), 1)
    return float(slope)


def grids(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        return {
            "update_d": ([512, 1024, 2048, 4096, 8192], 32768),
            "update_n": (3072, [4096, 16384, 65536, 262144]),
            "eig_d": [256, 512, 1024, 2048, 4096],
        }
    if quick:
        return {
            "update_d": ([128, 256, 512, 1024], 2048),
            "update_n": (512, [1024, 2048, 4096, 8192]),
            "eig_d": [128, 256, 512, 768],
        }
    return {
        "update_d": ([128, 256, 512, 1024, 2048], 4096),
        "update_n": (512, [1024, 2048, 4096, 8192, 16384, 32768]),
        "eig_d": [128, 256, 512, 1024, 1536],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    budget = 0.2 if args.quick else 0.5
    for device in devices(args.device):
        g = grids(device, args.quick)
        dims, n_fixed = g["update_d"]
        d_fixed, ns = g["update_n"]
        curves = {
            "update_vs_D": {
                "x": dims,
                "fixed": {"N": n_fixed},
                "seconds": [update_time(device, n_fixed, d, budget) for d in dims],
            },
            "update_vs_N": {
                "x": ns,
                "fixed": {"D": d_fixed},
                "seconds": [update_time(device, n, d_fixed, budget) for n in ns],
            },
            "eigvalsh_f64_vs_D": {
                "x": g["eig_d"],
                "fixed": {},
                "seconds": [eig_time(device, d, budget) for d in g["eig_d"]],
            },
        }
        for name, curve in curves.items():
            curve["exponent"] = fit(curve["x"], curve["seconds"])
            print(
                f"{device.type} {name}: exponent {curve['exponent']:.2f} "
                f"({', '.join(f'{x}: {t * 1e3:.1f} ms' for x, t in zip(curve['x'], curve['seconds']))})",
                flush=True,
            )
        png = plot(curves, device, args)
        write_result(
            args.out, "scaling", device, {"fit_points": FIT_POINTS, "curves": curves, "png": png.name}, args.quick
        )


def plot(curves: dict, device: torch.device, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, marker in (("update_vs_D", "o"), ("eigvalsh_f64_vs_D", "s")):
        c = curves[name]
        label = f"update, N={c['fixed']['N']}" if name == "update_vs_D" else "eigvalsh float64, one matrix"
        left.loglog(c["x"], c["seconds"], marker=marker, label=f"{label}: ~D^{c['exponent']:.2f}")
    left.set_xlabel("FFN width D")
    left.set_ylabel("seconds")
    left.set_title("cost against D")
    left.legend()
    c = curves["update_vs_N"]
    right.loglog(c["x"], c["seconds"], marker="o", label=f"update, D={c['fixed']['D']}: ~N^{c['exponent']:.2f}")
    right.set_xlabel("tokens per update N")
    right.set_title("cost against tokens (memory stays 2·D²·8 B)")
    right.legend()
    from matplotlib.ticker import NullFormatter

    for ax, sizes in (
        (left, sorted(set(curves["update_vs_D"]["x"]) | set(curves["eigvalsh_f64_vs_D"]["x"]))),
        (right, c["x"]),
    ):
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(sizes, labels=[str(size) for size in sizes])  # the measured sizes, not powers of ten
        ax.xaxis.set_minor_formatter(NullFormatter())
    threads = torch.get_num_threads()
    fig.suptitle(
        f"nerve_hf covariance cost on {device_label(device)} ({threads} thread{'s' if threads > 1 else ''}; "
        f"exponent fitted over the {FIT_POINTS} largest sizes)",
        fontsize=10,
    )
    fig.tight_layout()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scaling_{device_label(device)}{'_quick' if args.quick else ''}.png"
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
