"""A cost model of one NerVE measurement from GPT-2 small on 1 process to LLaMA-70B on 512, with measured inputs.

Inputs, all measured except the interconnect:

* per-matrix float64 ``eigvalsh`` seconds, from a committed ``eigendecomposition_<device>.json`` (CPU here,
  or the H100 file), fitted as ``t(D) = a · D^b`` by least squares on log t, and scaled as D³ beyond the
  widest measured matrix;
* gloo bytes/second of ``all_reduce``, ``reduce_scatter`` and ``all_gather`` with 2 and 4 processes on
  this machine (``--measure``: runs the collectives under torchrun, and one real sharded measurement,
  whose communication time checks the model's communication term);
* an interconnect figure for large runs (``--interconnect-gbps``, GB/s per process, stated not measured).

Per process and measurement, for M FFNs of width D over W data-parallel processes (one measurement of
every FFN; ``layers_per_step`` divides M):

* replicated spectra: state 2 (D² + D) 8 M bytes; an all-reduce of 2 M (D² + D) float64 (ring: each
  process sends 2 (W − 1)/W of it); every process decomposes 2 M matrices;
* sharded spectra (the default under several processes): the same state; an all-reduce of the counts and
  means, a reduce-scatter of the upper triangles (each sends (W − 1)/W of W · K · 8 bytes, K the largest
  share), an all-gather of the rows; each process decomposes 2 ⌈M / W⌉ matrices at the most;
* site-sharded: state and work of ⌈M / W⌉ FFNs, only the row all-gather.

    python benchmarks/perf/scaling_model.py --measure        # gloo figures here, check, table; writes JSON
    python benchmarks/perf/scaling_model.py --eig-file benchmarks/results/perf/eigendecomposition_cuda-...json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS  # noqa: E402

sys.path.insert(0, str(REPO))
from nerve_hf.parallel.sharded_spectra import assign_owners, exchange_bytes  # noqa: E402

MODELS = {  # name: (FFNs, d_ff)
    "GPT-2 small": (12, 3072),
    "LLaMA-7B": (32, 11008),
    "LLaMA-13B": (40, 13824),
    "LLaMA-70B": (80, 28672),
}
WORLDS = (1, 8, 64, 512)
MEASURED_WORLDS = (2, 4)
SIZES_MB = (4, 16, 64)  # message sizes of the bandwidth measurement


# ------------------------------------------------------------------ inputs
def fit_eigvalsh(path: Path) -> dict:
    """``t(D) = a · D^b`` from an eigendecomposition result file (seconds per matrix, float64)."""
    results = json.loads(path.read_text())["results"]
    dims = np.array([r["dim"] for r in results], dtype=float)
    seconds = np.array([r["seconds"]["batched_f64"] / r["layers"] for r in results])
    slope, intercept = np.polyfit(np.log(dims), np.log(seconds), 1)
    return {
        "file": str(path.relative_to(REPO)),
        "a": float(math.exp(intercept)),
        "b": float(slope),
        "points": [[int(d), float(s)] for d, s in zip(dims, seconds)],
    }


def eig_seconds(fit: dict, dim: int) -> float:
    """The fit inside the measured widths; beyond the widest, its time scaled by (D / D_max)³, the
    asymptotic cost of the tridiagonal reduction (small matrices are latency-bound, so the fitted
    exponent is below 3 and would underestimate wide FFNs)."""
    widest, seconds = max(fit["points"])
    if dim > widest:
        return seconds * (dim / widest) ** 3
    return fit["a"] * dim ** fit["b"]


def _worker(out: str) -> None:
    """Under torchrun: time the three collectives on float64 buffers, then one sharded measurement."""
    import torch
    import torch.distributed as dist

    from nerve_hf.parallel.sharded_spectra import sharded_metric_values
    from nerve_hf.stats.covariance import CovarianceAccumulator

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    timings = {}
    for mb in SIZES_MB:
        n = mb * 2**20 // 8 // world * world
        data = torch.ones(n, dtype=torch.float64)
        chunk = torch.empty(n // world, dtype=torch.float64)
        gathered = torch.empty(n, dtype=torch.float64)
        ops = {
            "all_reduce": lambda data=data: dist.all_reduce(data),
            "reduce_scatter": lambda chunk=chunk, data=data: dist.reduce_scatter_tensor(chunk, data),
            "all_gather": lambda gathered=gathered, chunk=chunk: dist.all_gather_into_tensor(gathered, chunk),
        }
        for name, op in ops.items():
            op()  # warm up
            dist.barrier()
            start = time.perf_counter()
            for _ in range(3):
                op()
            dist.barrier()
            per_process = n * 8 if name != "all_gather" else n // world * 8  # each process's input
            timings.setdefault(name, []).append([per_process, (time.perf_counter() - start) / 3])
    # one sharded measurement of 8 FFNs of width 512 (statistics of random rows), communication timed
    torch.manual_seed(rank)
    pairs = []
    for _ in range(8):
        pre, post = CovarianceAccumulator(512), CovarianceAccumulator(512)
        x = torch.randn(1024, 512)
        pre.update(x)
        post.update(torch.nn.functional.gelu(x))
        pairs.append((pre, post))
    import nerve_hf.parallel.sharded_spectra as sharded

    real = sharded.metric_values
    compute_seconds = []

    def timed_metric_values(*args, **kwargs):  # the eigendecomposition part, excluded from communication
        start = time.perf_counter()
        result = real(*args, **kwargs)
        compute_seconds.append(time.perf_counter() - start)
        return result

    sharded.metric_values = timed_metric_values
    in_collectives = []  # seconds spent inside the exchanges (waiting included), not packing

    def timed(collective):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            result = collective(*args, **kwargs)
            in_collectives.append(time.perf_counter() - start)
            return result

        return wrapped

    import nerve_hf.parallel.comm as distributed

    for name in ("all_reduce_sum", "reduce_scatter_sum", "reduce_sum", "all_gather"):
        setattr(distributed, name, timed(getattr(distributed, name)))
    dist.barrier()
    start = time.perf_counter()
    sharded_metric_values(pairs, "all")
    total = time.perf_counter() - start
    compute = dist_max(compute_seconds[0])
    comm = dist_max(sum(in_collectives))
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "world": world,
                    "timings": timings,
                    "measurement": {
                        "ffns": 8,
                        "dim": 512,
                        "seconds": total,
                        "eig_seconds": compute,
                        "comm_seconds": comm,
                    },
                }
            )
        )
    dist.destroy_process_group()


def dist_max(value: float) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def measure_gloo(world: int) -> dict:
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"nerve_gloo_{world}_{os.getpid()}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={world}",
        __file__,
        "--worker",
        str(out),
    ]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def bandwidth(timings: dict, world: int) -> dict:
    """Link bytes/second of each collective (the ring's bytes sent per process over its time), from its
    largest message."""
    return {name: ring_factor(name, world) * points[-1][0] / points[-1][1] for name, points in timings.items()}


# ------------------------------------------------------------------ the model
def ring_factor(name: str, world: int) -> float:
    """Bytes a ring collective sends per process, per byte of its per-process input."""
    return {
        "all_reduce": 2 * (world - 1) / world,
        "reduce_scatter": (world - 1) / world,
        "reduce": 1.0,
        "all_gather": world - 1,
    }[name]


def ring_seconds(name: str, input_bytes: float, world: int, bytes_per_second: float) -> float:
    """Seconds of a ring collective whose per-process input is ``input_bytes``, over links of that rate."""
    return 0.0 if world == 1 else ring_factor(name, world) * input_bytes / bytes_per_second


def measurement_cost(ffns: int, dim: int, world: int, fit: dict, bandwidths: dict, mode: str) -> dict:
    """Per-process memory, bytes sent and seconds of one measurement (mode: replicated, sharded, site)."""
    state_per_ffn = 2 * (dim * dim + dim) * 8
    dims = [dim] * ffns
    if mode == "site":
        owned = max(assign_owners(dims, world, power=2).count(r) for r in range(world))
        gather = exchange_bytes(dims, world)["all_gather"]
        comm = {"all_gather": gather}
        matrices = 2 * owned
        state = owned * state_per_ffn
    elif mode == "sharded":
        exchanged = exchange_bytes(dims, world)
        comm = {
            "all_reduce": exchanged["totals"],
            "reduce_scatter": exchanged["reduce_scatter"],
            "reduce": exchanged["reduce"],
            "all_gather": exchanged["all_gather"],
        }
        matrices = 2 * max(assign_owners(dims, world).count(r) for r in range(world))
        state = ffns * state_per_ffn
    else:
        comm = {"all_reduce": ffns * state_per_ffn}
        matrices = 2 * ffns
        state = ffns * state_per_ffn
    if world == 1:
        comm = {}
    comm_seconds = sum(
        ring_seconds(name, size, world, bandwidths.get(name, bandwidths["all_reduce"])) for name, size in comm.items()
    )
    sent = sum(size * ring_factor(name, world) for name, size in comm.items())
    eig = matrices * eig_seconds(fit, dim)
    return {
        "state_gib": state / 2**30,
        "sent_gib": sent / 2**30,
        "comm_s": comm_seconds,
        "eig_s": eig,
        "total_s": comm_seconds + eig,
    }


def table(fit: dict, interconnect: dict) -> list[dict]:
    rows = []
    for model, (ffns, dim) in MODELS.items():
        for world in WORLDS:
            for mode in ("replicated", "sharded", "site"):
                if world == 1 and mode != "replicated":
                    continue
                cost = measurement_cost(ffns, dim, world, fit, interconnect, mode)
                rows.append({"model": model, "ffns": ffns, "dim": dim, "world": world, "mode": mode, **cost})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | W | spectra | state / process | sent / process | communication | eigendecompositions | total |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['world']} | {r['mode']} | {r['state_gib']:.2f} GiB | {r['sent_gib']:.2f} GiB | "
            f"{_s(r['comm_s'])} | {_s(r['eig_s'])} | {_s(r['total_s'])} |"
        )
    return "\n".join(lines)


def _s(seconds: float) -> str:
    if seconds == 0:
        return "0"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--eig-file",
        type=Path,
        default=RESULTS / "eigendecomposition_cuda-nvidia-h100-80gb-hbm3.json",
        help="eigendecomposition result file whose per-matrix times the model uses",
    )
    parser.add_argument(
        "--interconnect-gbps",
        type=float,
        default=50.0,
        help="stated bandwidth per process of a large run's collectives, GB/s (default 50: "
        "an InfiniBand NDR port's order of magnitude)",
    )
    parser.add_argument(
        "--measure", action="store_true", help="measure gloo here with 2 and 4 processes and check the model"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling_model.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return
    fit = fit_eigvalsh(args.eig_file)
    payload = {"eigvalsh_fit": fit, "interconnect_gbps": args.interconnect_gbps}
    if args.measure:
        checks = []
        for world in MEASURED_WORLDS:
            measured = measure_gloo(world)
            rates = bandwidth(measured["timings"], world)
            m = measured["measurement"]
            predicted = measurement_cost(m["ffns"], m["dim"], world, fit, rates, "sharded")["comm_s"]
            checks.append(
                {
                    "world": world,
                    "bytes_per_second": rates,
                    "timings": measured["timings"],
                    "measured_total_s": m["seconds"],
                    "measured_eig_s": m["eig_seconds"],
                    "measured_comm_s": m["comm_seconds"],
                    "predicted_comm_s": predicted,
                    "comm_ratio_measured_over_model": m["comm_seconds"] / predicted,
                }
            )
            print(
                f"gloo, {world} processes: "
                + ", ".join(f"{k} {v / 1e9:.2f} GB/s" for k, v in rates.items())
                + f"; sharded measurement of 8 x 512: {m['seconds'] * 1e3:.0f} ms in all, of it in the exchanges "
                f"{m['comm_seconds'] * 1e3:.1f} ms measured against {predicted * 1e3:.1f} ms modelled, "
                f"eigendecompositions {m['eig_seconds'] * 1e3:.0f} ms"
            )
        payload["gloo_checks"] = checks
    rate = args.interconnect_gbps * 1e9
    rows = table(fit, {"all_reduce": rate, "reduce_scatter": rate, "all_gather": rate})
    payload["rows"] = rows
    text = markdown(rows)
    print(text)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    table_file = args.out.with_suffix(".md")
    header = (
        f"# One NerVE measurement, modelled (`benchmarks/perf/scaling_model.py`)\n\n"
        f"Eigendecompositions: t(D) = {fit['a']:.3g} · D^{fit['b']:.2f} s per float64 matrix, fitted to "
        f"`{fit['file']}` (D³ beyond its widest matrix, D = {max(fit['points'])[0]}). "
        f"Collectives: {args.interconnect_gbps:g} GB/s per process (stated). "
        f"Spectra: replicated (every process decomposes all), sharded (each its share), site (site-sharded "
        f"measurement: each process its own FFNs on its own tokens).\n\n"
    )
    table_file.write_text(header + text + "\n")
    print(f"wrote {args.out} and {table_file}")


if __name__ == "__main__":
    main()
