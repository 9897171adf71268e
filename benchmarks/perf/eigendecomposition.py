"""Cost of the spectra: batched vs one-by-one eigvalsh, float64 vs float32, and PR by the trace.

For L covariance matrices of width D (realistic spectra: a decaying power law, as FFN activations
have), timed with ``torch.utils.benchmark.Timer``:

* ``batched_f64``: one ``torch.linalg.eigvalsh`` on ``[L, D, D]`` float64 (what FFNTracker.compute does).
* ``loop_f64``: L separate calls.
* ``ours_f64``: what ``nerve_hf.spectra`` calls: on the CPU the batch spread over threads, on CUDA one
  matrix per side stream (each fed by its own host thread) from D = 256 on.
* ``batched_f32``: the same in float32, with the error it makes in SE and PR against float64.
* ``pr_trace``: ``participation_ratio_from_covariance`` (tr(Σ)² / ‖Σ‖²_F) on the float64 stack, and its
  agreement with PR from the float64 eigenvalues.

Run: ``python benchmarks/perf/eigendecomposition.py --device auto [--quick]``
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_args, apply_threads, devices, write_result
from torch.utils.benchmark import Timer

from nerve_hf.metrics import participation_ratio, spectral_entropy
from nerve_hf.spectra.exact import _eigvalsh, participation_ratio_from_covariance


def covariances(layers: int, dim: int, device: torch.device) -> torch.Tensor:
    """[L, D, D] float64 SPD matrices Q diag(λ) Qᵀ with λ_k ∝ k^-1.2 (PR far below D, like real FFNs)."""
    generator = torch.Generator(device="cpu").manual_seed(dim)
    lam = torch.arange(1, dim + 1, dtype=torch.float64, device=device) ** -1.2
    out = []
    for _ in range(layers):  # QR on the device: D = 11008 would take minutes on a CPU
        q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=generator).to(device))
        out.append((q * lam) @ q.T)
    return torch.stack(out)  # [L, D, D]


def timed(stmt: str, env: dict, budget: float) -> float:
    timer = Timer(stmt, globals=env, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=budget).median


def sizes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """(layers, D) pairs: widths a GPU handles easily take minutes in float64 on 2 CPU cores."""
    if device.type == "cuda":
        return [(12, 512), (12, 1024), (12, 3072)] + ([] if quick else [(4, 4096), (2, 11008)])
    return [(4, 256), (4, 512)] if quick else [(8, 256), (8, 512), (4, 1024), (2, 2048)]


def bench(device: torch.device, layers: int, dim: int, quick: bool) -> dict:
    stack = covariances(layers, dim, device)
    env = {"torch": torch, "stack": stack, "stack32": stack.float(), "pr": participation_ratio_from_covariance}
    budget = 0.2 if quick else 1.0
    env["eigvalsh"], env["ours"] = torch.linalg.eigvalsh, _eigvalsh
    torch.linalg.eigvalsh(stack[:1])  # warm-up (cuSOLVER handles, LAPACK workspaces)
    t = {
        "batched_f64": timed("eigvalsh(stack)", env, budget),
        "loop_f64": timed("for m in stack:\n    eigvalsh(m)", env, budget),
        "ours_f64": timed("ours(stack)", env, budget),
        "batched_f32": timed("eigvalsh(stack32)", env, budget),
        "pr_trace_f64": timed("pr(stack)", env, budget),
    }
    eig64 = torch.linalg.eigvalsh(stack).flip(-1).cpu()
    eig32 = torch.linalg.eigvalsh(env["stack32"]).flip(-1).double().cpu()
    pr64, pr32 = participation_ratio(eig64), participation_ratio(eig32)
    se64, se32 = spectral_entropy(eig64), spectral_entropy(eig32)
    pr_trace = participation_ratio_from_covariance(stack).cpu()
    result = {
        "layers": layers,
        "dim": dim,
        "seconds": t,
        "speedup_batched_vs_loop": t["loop_f64"] / t["batched_f64"],
        "speedup_ours_vs_batched": t["batched_f64"] / t["ours_f64"],
        "speedup_f32_vs_f64": t["batched_f64"] / t["batched_f32"],
        "speedup_pr_trace_vs_eigvalsh_f64": t["batched_f64"] / t["pr_trace_f64"],
        "f32_max_rel_err_pr": float(((pr32 - pr64).abs() / pr64).max()),
        "f32_max_rel_err_se": float(((se32 - se64).abs() / se64).max()),
        "pr_trace_max_rel_err_vs_eigvalsh": float(((pr_trace - pr64).abs() / pr64).max()),
        "pr": float(pr64.mean()),
    }
    print(
        f"{device.type} L={layers:<2} D={dim:<5}: batched f64 {t['batched_f64'] * 1e3:9.1f} ms, loop "
        f"{t['loop_f64'] * 1e3:9.1f} ms, ours {t['ours_f64'] * 1e3:9.1f} ms, batched f32 "
        f"{t['batched_f32'] * 1e3:9.1f} ms, PR by trace "
        f"{t['pr_trace_f64'] * 1e3:7.2f} ms (rel err {result['pr_trace_max_rel_err_vs_eigvalsh']:.1e}); "
        f"f32 rel err PR {result['f32_max_rel_err_pr']:.1e} SE {result['f32_max_rel_err_se']:.1e}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    for device in devices(args.device):
        rows = [bench(device, layers, dim, args.quick) for layers, dim in sizes(device, args.quick)]
        write_result(args.out, "eigendecomposition", device, {"results": rows}, args.quick)


if __name__ == "__main__":
    main()
