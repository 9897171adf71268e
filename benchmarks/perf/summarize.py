"""Turn the perf JSON results in a folder into one markdown file, SUMMARY.md, next to them.

Every number in a table comes from one JSON file, i.e. from one run of one script on one device.

Run: ``python benchmarks/perf/summarize.py [--out benchmarks/results/perf]``
"""

from __future__ import annotations

import argparse
import json

from _common import add_common_args


def env_line(env: dict) -> str:
    parts = [
        env.get("gpu") or env.get("cpu"),
        f"{env.get('cpu_threads')} torch threads",
        f"torch {env.get('torch')}",
        f"load avg {env.get('load_average_1_5_15')}",
        f"commit {env.get('git_commit')}",
        env.get("date"),
    ]
    return "; ".join(str(p) for p in parts if p)


def accumulator(r: dict) -> list[str]:
    out = [
        "| D | N | dtype | ours ms | bare GEMM ms | ratio (bare/ours) | against | also: ratio vs native bf16 GEMM |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        m = row["median_s"]
        ref = (
            "`x.T @ x` fp32 of the upcast rows"
            if row["reference"] == "bare_fp32_of_upcast"
            else f"`x.T @ x` {row['dtype']}"
        )
        native = f"{row['ratio_vs_bare']:.2f}" if row["reference"] != "bare" else ""
        bare = m.get(row["reference"], m["bare"])
        out.append(
            f"| {row['dim']} | {row['rows']} | {row['dtype']} | {m['ours'] * 1e3:.1f} | {bare * 1e3:.1f} | "
            f"**{row['ratio']:.2f}** | {ref} | {native} |"
        )
    return out


def training(r: dict) -> list[str]:
    m = r["model"]
    out = [
        f"GPT-2 with {m['n_layer']} layers, n_embd {m['n_embd']}, d_ff {m['n_inner']}, vocabulary "
        f"{m['vocab_size']}, {r['batch'] * r['seq_len']} tokens per step.",
        "",
    ]
    if "overhead" in r:
        paper = "paper" in next(iter(r["overhead"].values()))["kinds"]  # result files before issue #29: "naive"
        out += [
            "| every_n_steps | callback | wall time vs none | one measurement (s) | one measurement vs paper (fp32) "
            "| overhead at this N (per-step) | projected at every 100 | peak RSS MB (none) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for every_n, s in r["overhead"].items():
            base_rss = s["kinds"]["none"]["peak_rss_mb"]
            for kind in [kind for kind in OVERHEAD_KINDS if kind in s["kinds"]]:
                k = s["kinds"][kind]
                ratio = _vs_paper(s["kinds"], kind)
                out.append(
                    f"| {every_n} | {LABELS.get(kind, kind)} | {k['wall_ratio_median']:.3f} | "
                    f"{k['measurement_event_seconds']:.3f} | {'' if ratio is None else f'{ratio:.2f}×'} | "
                    f"{k['per_step_overhead_pct']:.2f}% | {k['projected_overhead_pct_at_every_100']:.2f}% | "
                    f"{k['peak_rss_mb']:.0f} ({base_rss:.0f}) |"
                )
        out += [
            "",
            "`wall time vs none` compares medians of whole runs and needs a quiet machine to resolve a few "
            "percent; `one measurement` (median measured step minus median unmeasured step of the same runs) "
            "divided by N unmeasured steps gives the overhead columns; `nerve_f32` is NerveCallback with "
            '`spectra_dtype="float32"`, `nerve_f32_noflow` also with `flow=False`; `paper` is the baseline, the '
            "paper's released code's approach in float32 (keep the step's activations, one fp32 covariance and "
            "one fp32 `eigvalsh` per matrix), `paper_f64` the same in float64; `vs paper` divides each kind's "
            "measurement by the unmeasured step of its own runs before the ratio, so load that changes between "
            "runs cancels; a ratio below 1 means faster than the paper's approach"
            + ("." if paper else " (this file predates the float32 baseline: its `naive` row is `paper_f64`)."),
            "",
        ]
    if "memory_sweep" in r:
        m = r["memory_sweep"]
        base = "paper" if "paper" in m["rows"][0] else "naive"
        copies = m.get("expected_paper_mb_per_1k_tokens", m.get("expected_naive_mb_per_1k_tokens"))
        out += [
            f"Memory against tokens per measurement (peak RSS over the no-callback run; expected NerveCallback "
            f"state {m['expected_nerve_state_mb']:.1f} MiB, the paper's approach's fp32 copies {copies:.1f} "
            f"MiB per 1k tokens):",
            "",
            "| tokens / measurement | NerveCallback MB | paper's approach MB | CUDA NerveCallback MB | CUDA paper MB |",
            "|---|---|---|---|---|",
        ]
        for row in m["rows"]:
            cuda = [row[k].get("cuda_over_none_mb") for k in ("nerve", base)]
            cuda_s = [f"{c:.0f}" if c is not None else "" for c in cuda]
            out.append(
                f"| {row['tokens_per_measurement']} | {row['nerve']['peak_rss_over_none_mb']:.0f} | "
                f"{row[base]['peak_rss_over_none_mb']:.0f} | {cuda_s[0]} | {cuda_s[1]} |"
            )
    return out


def _vs_paper(kinds: dict, kind: str):
    """One measurement's cost over the paper's float32 approach's, each first divided by the unmeasured step of
    its own runs (so a machine whose load changes between runs does not move the ratio); None without it."""
    paper = kinds.get("paper", {}).get("per_step_overhead_pct")
    return kinds[kind]["per_step_overhead_pct"] / paper if paper else None


# Row order of the overhead tables: ours, then the paper's approach (fp32, the baseline) and its fp64 row.
OVERHEAD_KINDS = ("nerve", "nerve_before", "nerve_pr", "nerve_f32", "nerve_f32_noflow", "paper", "paper_f64", "naive")
LABELS = {"naive": "paper_f64 (naive)"}


# Rows of the measurement breakdown, in the order of a measurement's path, with their labels.
BREAKDOWN_ROWS = {
    "hook_copies_selection": "hooks: detach, token selection, cap",
    "batch_scatter": "pre/post: batch scatter (fp32, upper block triangle)",
    "chan_merge": "pre/post: Chan merge into float64 moments",
    "update_checks": "pre/post: update's checks and reshapes",
    "flow_batch_scatter": "flow (input/output): batch scatter",
    "flow_chan_merge": "flow: Chan merge",
    "flow_update_checks": "flow: update's checks",
    "covariance_build": "pre/post: M2 / (n - 1)",
    "eigvalsh": "pre/post: float64 `eigvalsh`",
    "metrics": "pre/post: `spectrum_metrics`",
    "prepost_compute_other": "pre/post: rest of compute (finiteness test, rows)",
    "flow_covariance_build": "flow: M2 / (n - 1)",
    "flow_eigvalsh": "flow: float64 `eigvalsh`",
    "flow_metrics": "flow: padded JS",
    "flow_compute_other": "flow: rest of compute",
    "compute_other": "tracker.compute, the rest",
    "sinks_archive": "sink: spectra archive (.npz, fsync)",
    "sinks_records": "sink: JSONL records (fsync)",
    "sinks_histograms": "sink: histograms",
    "log_dict": "logged keys",
}


def breakdown(r: dict) -> list[str]:
    widths = [row["d_ff"] for row in r["results"]]
    out = [
        f"One measured step of the demo GPT-2 ({r['model']['n_layer']} layers, n_embd {r['model']['n_embd']}, "
        f"{r['results'][0]['tokens_per_step']} tokens per step), NerveCallback's defaults; median ms over "
        "measured steps of the library's own functions, timed in place (exclusive of what they call that has "
        "a row of its own).",
        "",
        "| part | " + " | ".join(f"D = {d} ms | share" for d in widths) + " |",
        "|---|" + "---|---|" * len(widths),
    ]
    for key, label in BREAKDOWN_ROWS.items():
        cells = []
        for row in r["results"]:
            b = row["breakdown_seconds"]
            cells.append(f"{b[key] * 1e3:.1f} | {100 * b[key] / b['sum']:.0f}%")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append(
        "| **sum** | "
        + " | ".join(f"**{row['breakdown_seconds']['sum'] * 1e3:.0f}** | " for row in r["results"])
        + " |"
    )
    out.append(
        "| measured step minus unmeasured step | "
        + " | ".join(f"{row['breakdown_seconds']['measured_step_extra'] * 1e3:.0f} | " for row in r["results"])
        + " |"
    )
    out += [
        "",
        "On the same step's activations (median of interleaved rounds, ms for all the step's matrices):",
        "",
        "| routine | " + " | ".join(f"D = {d} ms | max dev. / λ_max" for d in widths) + " |",
        "|---|" + "---|---|" * len(widths),
    ]
    for name in ("covariances_fp32", "eigvalsh_fp32", "total"):
        cells = [f"{row['paper_floor_seconds'][name] * 1e3:.1f} | " for row in r["results"]]
        out.append(f"| paper's floor: {name} | " + " | ".join(cells) + " |")
    for name in r["results"][0]["float64_eigenvalues_seconds"]:
        cells = [
            f"{row['float64_eigenvalues_seconds'][name] * 1e3:.1f} | "
            f"{row['float64_eigenvalues_max_deviation_rel_lambda_max'][name]:.1e}"
            for row in r["results"]
        ]
        out.append(f"| float64: {name} | " + " | ".join(cells) + " |")
    for name in r["results"][0].get("finiteness_test_seconds", {}):
        cells = [f"{row['finiteness_test_seconds'][name] * 1e3:.1f} | " for row in r["results"]]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def probe(r: dict) -> list[str]:
    out = [
        "| dtype | tokens/forward | plain tok/s | tracked tok/s | overhead | compute() s | compute(metrics='pr') s |"
        " state MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        out.append(
            f"| {row['dtype']} | {row['tokens_per_forward']} | {row['plain_tokens_per_s']:,.0f} | "
            f"{row['tracked_tokens_per_s']:,.0f} | {100 * row['overhead']:+.0f}% | {row['compute_all_s']:.2f} | "
            f"{row['compute_pr_only_s']:.3f} | {row['covariance_state_mib']:.0f} |"
        )
    return out


def eigen(r: dict) -> list[str]:
    out = [
        "| L | D | batched f64 ms | loop f64 ms | batched/loop speedup | nerve_hf f64 ms | f32 speedup "
        "| f32 rel err PR / SE | PR by trace ms | trace speedup | trace rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        s = row["seconds"]
        ours = f"{s['ours_f64'] * 1e3:.1f}" if "ours_f64" in s else "—"  # files measured before it existed
        out.append(
            f"| {row['layers']} | {row['dim']} | {s['batched_f64'] * 1e3:.1f} | {s['loop_f64'] * 1e3:.1f} | "
            f"{row['speedup_batched_vs_loop']:.2f} | {ours} | {row['speedup_f32_vs_f64']:.2f} | "
            f"{row['f32_max_rel_err_pr']:.1e} / {row['f32_max_rel_err_se']:.1e} | {s['pr_trace_f64'] * 1e3:.2f} | "
            f"{row['speedup_pr_trace_vs_eigvalsh_f64']:.0f}x | {row['pr_trace_max_rel_err_vs_eigvalsh']:.0e} |"
        )
    return out


def scaling(r: dict) -> list[str]:
    out = ["| curve | sizes | fitted exponent |", "|---|---|---|"]
    for name, c in r["curves"].items():
        out.append(f"| {name} {c['fixed'] or ''} | {c['x'][0]}..{c['x'][-1]} | **{c['exponent']:.2f}** |")
    out += ["", f"![scaling]({r['png']})"]
    return out


SECTIONS = [
    ("accumulator_throughput", "Accumulator throughput vs the bare GEMM (target ratio >= 0.8)", accumulator),
    ("training_overhead", "Training overhead of the demo model", training),
    ("measurement_breakdown", "Where one measurement's time goes", breakdown),
    ("probe_throughput", "Probe throughput (GPT-2-small shape, 12 x D=3072)", probe),
    ("eigendecomposition", "Eigendecomposition cost", eigen),
    ("scaling", "Growth with D and N", scaling),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    args = parser.parse_args()
    files = sorted(args.out.glob("*.json"))
    lines = [
        "# Perf results",
        "",
        "Generated by `benchmarks/perf/summarize.py` from the JSON files in this folder; each table is one run "
        "of one script on one device (see each file's `environment`). `_quick` files used `--quick` settings.",
        "",
    ]
    notes = sorted(args.out.glob("*_notes.md"))
    if notes:
        lines += [
            "What these files do not hold (runs cut short, rows that predate a fix) is in "
            + ", ".join(f"[{n.name}]({n.name})" for n in notes)
            + ".",
            "",
        ]
    for prefix, title, render in SECTIONS:
        for path in files:
            if not path.stem.startswith(prefix + "_") or path.stem.startswith(prefix + "_impl-"):
                continue
            r = json.loads(path.read_text())
            if "environment" not in r:  # scaling_model.json: a model, not a run; it has its own scaling_model.md
                continue
            lines += [f"## {title}: `{path.name}`", "", f"_{env_line(r['environment'])}_", ""] + render(r) + [""]
    for path in files:  # older implementations timed with --impl
        if "_impl-" in path.stem:
            r = json.loads(path.read_text())
            lines += (
                [
                    f"## Accumulator throughput of `{r['impl']}`: `{path.name}`",
                    "",
                    f"_{env_line(r['environment'])}_",
                    "",
                ]
                + accumulator(r)
                + [""]
            )
    (args.out / "SUMMARY.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
