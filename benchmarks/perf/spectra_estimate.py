"""``spectra="estimate"`` against the exact float64 eigendecomposition, on real activation covariances.

For each D in 2048, 4096, 8192 a GPT-2 built from a config (2 layers, n_embd = D/4, d_ff = D, random
init, seed 0) reads the embedded stdlib code corpus (tokenised with the locally trained BPE, as in
``spectra_precision.py``); ``FFNTracker`` accumulates the pre/post covariances of both FFNs (the pre has
rank <= D/4). Each pair is then measured twice: exactly (``torch.linalg.eigvalsh`` float64 +
:func:`nerve_hf.metrics.spectrum_metrics`, the package's path) and by
:func:`nerve_hf.spectra.estimate.estimated_metrics` (top-k Lanczos + SLQ, fixed seed). Recorded per FFN:
both times (CPU seconds of this process, robust on a shared machine, and wall seconds), the error of
every metric, the estimate's stated standard error and whether the exact value lies in its bounds.
Seeds are fixed, so runs repeat.

Run: ``python benchmarks/perf/spectra_estimate.py [--quick] [--threads 1]`` (``--quick``: D = 2048 only).
Writes ``spectra_estimate_cpu[_quick].json`` and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from _common import RESULTS, apply_threads, write_result

ESTIMATED = ("se_pre", "se_post", "eee_pre", "eee_post", "js")


def covariances(dim: int, tokens: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pre, post) float64 covariances of both FFNs of a 2-layer GPT-2 with n_embd = dim/4, d_ff = dim."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nerve_hf import FFNTracker
    from nerve_hf.data import get_tokenizer, load_stdlib_corpus

    tokenizer = get_tokenizer(vocab_size=2048, max_bytes=400_000)
    text = "\n".join(load_stdlib_corpus(max_bytes=400_000)["train"]["text"])
    ids = torch.tensor(tokenizer(text)["input_ids"][:tokens], dtype=torch.long).view(-1, 128)  # [tokens/128, 128]
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=dim // 4, n_head=8, n_layer=2, n_inner=dim)
    model = GPT2LMHeadModel(config).eval()
    tracker = FFNTracker(model)
    with tracker, torch.no_grad():
        for batch in ids.split(8):
            model(input_ids=batch)
    return [(state.pre.covariance(), state.post.covariance()) for state in tracker._states]


def inside(value: float, bounds, rel: float = 1e-6) -> bool:
    """``value`` within ``bounds`` up to ``rel`` of its size: PR's bounds are the trace identity's value, and
    the exact path clamps the round-off negatives of a rank-deficient covariance first (~1e-7 of tr Σ)."""
    slack = rel * abs(value) + 1e-12
    return bounds[0] - slack <= value <= bounds[1] + slack


def timed(function, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    out = function(*args, **kwargs)
    return out, time.process_time() - cpu, time.perf_counter() - wall


def measure(dim: int, tokens: int, options: dict) -> list[dict]:
    from nerve_hf.metrics import METRIC_NAMES, spectrum_metrics
    from nerve_hf.spectra.estimate import estimated_metrics

    start = time.perf_counter()
    pairs = covariances(dim, tokens)
    print(f"D {dim}: covariances of {len(pairs)} FFNs from {tokens} tokens in {time.perf_counter() - start:.0f} s")
    rows = []
    for layer, (pre, post) in enumerate(pairs):
        (eig_pre, cpu_pre, wall_pre) = timed(torch.linalg.eigvalsh, pre)
        (eig_post, cpu_post, wall_post) = timed(torch.linalg.eigvalsh, post)
        exact = {name: float(v) for name, v in spectrum_metrics(eig_pre, eig_post).items()}
        est, cpu_est, wall_est = timed(estimated_metrics, pre, post, **options)
        errors = {name: est.values[name] - exact[name] for name in METRIC_NAMES}
        row = {
            "dim": dim,
            "layer": layer,
            "tokens": tokens,
            "residual_mass": {"pre": est.pre.residual_mass, "post": est.post.residual_mass},
            "cpu_s": {"exact": cpu_pre + cpu_post, "estimate": cpu_est},
            "wall_s": {"exact": wall_pre + wall_post, "estimate": wall_est},
            "speedup_cpu": (cpu_pre + cpu_post) / cpu_est,
            "speedup_wall": (wall_pre + wall_post) / wall_est,
            "exact": exact,
            "estimate": est.values,
            "error": errors,
            "relative_error": {name: abs(errors[name]) / abs(exact[name]) for name in METRIC_NAMES},
            "stderr": est.stderr,
            "error_over_stderr": {name: errors[name] / est.stderr[name] for name in ESTIMATED},
            "bounds": est.bounds,
            "within_bounds": {n: inside(exact[n], est.bounds[n]) for n in METRIC_NAMES},
        }
        rows.append(row)
        print(
            f"  layer {layer}: exact {cpu_pre + cpu_post:.1f} s CPU, estimate {cpu_est:.1f} s "
            f"({row['speedup_cpu']:.1f}x); "
            + ", ".join(f"{n} {errors[n]:+.1e} (±{est.stderr[n]:.0e})" for n in ESTIMATED),
            flush=True,
        )
        del eig_pre, eig_post, est
    del pairs
    gc.collect()
    return rows


def markdown(rows: list[dict], options: dict, threads: int) -> str:
    names = ("se_pre", "se_post", "pr_pre", "pr_post", "eee_pre", "eee_post", "js")
    lines = [
        '# spectra="estimate" vs exact float64 eigvalsh',
        "",
        f"Real activation covariances (GPT-2, 2 layers, n_embd = D/4, d_ff = D, random init, stdlib corpus); "
        f"estimate options {options}; {threads} torch thread(s); times are CPU seconds of the process for "
        f"one (pre, post) pair. Cells: estimate − exact (stated standard error).",
        "",
        "| D | layer | R pre / post | exact s | estimate s | speedup | " + " | ".join(names) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = [f"{r['error'][n]:+.1e}" + (f" ({r['stderr'][n]:.0e})" if n in ESTIMATED else "") for n in names]
        lines.append(
            f"| {r['dim']} | {r['layer']} | {r['residual_mass']['pre']:.2f} / {r['residual_mass']['post']:.2f} | "
            f"{r['cpu_s']['exact']:.1f} | {r['cpu_s']['estimate']:.1f} | {r['speedup_cpu']:.1f}x | "
            + " | ".join(cells)
            + " |"
        )
    names_inside = all(inside(r["exact"][n], r["bounds"][n]) for r in rows for n in names)
    worst = max(abs(z) for r in rows for z in r["error_over_stderr"].values())
    lines += [
        "",
        f"Exact values inside the stated bounds (to 1e-6 relative): {'all' if names_inside else 'NOT all'}; "
        f"largest |error| / stderr: "
        f"{worst:.1f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    from nerve_hf.spectra.estimate import DEFAULT_LANCZOS_STEPS, DEFAULT_PROBES, DEFAULT_TOP_K

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="D = 2048 only (about a minute on 2 cores)")
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 4096, 8192], help="FFN widths D")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="leading eigenpairs computed exactly")
    parser.add_argument("--probes", type=int, default=DEFAULT_PROBES, help="Rademacher probes of the SLQ")
    parser.add_argument("--lanczos-steps", type=int, default=DEFAULT_LANCZOS_STEPS, help="Lanczos steps per probe")
    parser.add_argument("--seed", type=int, default=0, help="seed of the probes and ARPACK's start vector")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch and BLAS (1: stable ratios)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and markdown results")
    parser.add_argument("--render", type=Path, default=None, help="only rewrite the markdown of this JSON result")
    args = parser.parse_args()
    if args.render is not None:
        record = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(record["rows"], record["options"], record["threads"]))
        return
    apply_threads(args.threads)
    from threadpoolctl import threadpool_limits

    dims = [2048] if args.quick else args.dims
    options = dict(top_k=args.top_k, probes=args.probes, lanczos_steps=args.lanczos_steps, seed=args.seed)
    rows = []
    with threadpool_limits(args.threads):  # NumPy/SciPy's BLAS (ARPACK's orthogonalisation) too
        for dim in dims:
            rows.extend(measure(dim, max(4096, dim), options))
    payload = {"options": options, "threads": args.threads, "rows": rows}
    path = write_result(args.out, "spectra_estimate", torch.device("cpu"), payload, quick=args.quick)
    path.with_suffix(".md").write_text(markdown(rows, options, args.threads))
    print(f"wrote {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
