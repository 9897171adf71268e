"""The ``moe`` experiment beyond the paper: per-expert statistics at the final evaluation, the finding that
checks them and the table of routed experts in the README.

Every number comes from a result file's ``experts`` entry (``benchmarks/_experts.py``) at its last
evaluation, pooling the (layer, expert) cells of a run: an expert's PR gain is ``pr_post / pr_pre``; cells
without a spectrum (too few tokens) are counted and left out. Experts are not paired across runs (each run
routes differently), so AdamW and Muon are compared by their distributions over experts.
"""

from __future__ import annotations

import math
from statistics import median

from _findings import Finding

EXPERIMENT = "moe"
MOE_RUNS = ("moe-adamw", "moe-muon")
DENSE_RUNS = ("dense-adamw", "dense-muon")


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def final_cells(entry: dict) -> list[dict]:
    """One dict per (layer, expert) at the last evaluation: ``layer, expert, tokens, width`` and the metrics."""
    experts = entry["experts"]
    cells = []
    for li, layer in enumerate(experts["layers"]):
        for e in range(experts["experts"]):
            cell = {"layer": layer, "expert": e, "tokens": experts["tokens"][-1][li][e], "width": experts["dims"][li]}
            cell.update({m: values[-1][li][e] for m, values in experts["per_expert"].items()})
            pre, post = cell["pr_pre"], cell["pr_post"]
            cell["pr_gain"] = post / pre if pre and post is not None else None
            cells.append(cell)
    return cells


def spearman(x: list[float], y: list[float]) -> tuple[float | None, int]:
    """Spearman rank correlation (scipy) and n; None below 3 pairs or for a constant series."""
    from scipy.stats import spearmanr

    n = len(x)
    if n < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None, n
    return float(spearmanr(x, y).statistic), n


def expert_summary(entry: dict) -> dict:
    """Final-evaluation summary of one MoE run over its experts (see the module docstring)."""
    cells = final_cells(entry)
    measured = [c for c in cells if c["pr_gain"] is not None]
    gains = [c["pr_gain"] for c in measured]
    tokens = [c["tokens"] for c in measured]
    routing = entry["experts"]["routing"]
    rho_post, n = spearman(tokens, [c["pr_post"] for c in measured])
    rho_gain, _ = spearman(tokens, gains)
    rarest = min(measured, key=lambda c: c["tokens"]) if measured else None
    layer_mean = lambda key: median(v for v in routing[key][-1] if v is not None)  # noqa: E731
    return {
        "experts": len(cells),
        "measured": len(measured),
        "dead": sum(c["tokens"] == 0 for c in cells),
        "tokens_min": min(c["tokens"] for c in cells),
        "tokens_median": median(c["tokens"] for c in cells),
        "tokens_max": max(c["tokens"] for c in cells),
        "load_cv": layer_mean("load_cv"),
        "load_entropy": layer_mean("load_entropy"),
        "router_entropy": entry["experts"]["router_entropy"][-1],
        "gain_above_1": sum(g > 1 for g in gains),
        "gain_median": median(gains) if gains else None,
        "gain_min": min(gains) if gains else None,
        "gain_max": max(gains) if gains else None,
        "pr_pre_median": median(c["pr_pre"] for c in measured) if measured else None,
        "pr_post_median": median(c["pr_post"] for c in measured) if measured else None,
        "se_post_median": median(c["se_post"] for c in measured) if measured else None,
        "rho_tokens_pr_post": rho_post,
        "rho_tokens_gain": rho_gain,
        "n": n,
        "rarest": rarest,
        "width": cells[0]["width"] if cells else None,
    }


def dense_gains(entry: dict) -> list[float]:
    """PR_post / PR_pre of each layer of a dense run at its last evaluation."""
    per_site = entry["nerve"]["per_site"]
    return [post / pre for pre, post in zip(per_site["pr_pre"][-1], per_site["pr_post"][-1]) if pre and post]


def experts_table(result: dict) -> str:
    """Markdown: one row per MoE run of ``result``, its experts at the final evaluation."""
    head = [
        "run", "experts (measured)", "dead", "tokens min / median / max", "load CV", "router entropy",
        "PR pre / post (median)", "PR gain median [min, max]", "gain > 1", "rho(tokens, PR_post)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, entry in result["runs"].items():
        if "experts" not in entry:
            continue
        s = expert_summary(entry)
        cells = [
            result.get("labels", {}).get(run, run),
            f"{s['experts']} ({s['measured']})",
            str(s["dead"]),
            f"{s['tokens_min']} / {s['tokens_median']:g} / {s['tokens_max']}",
            _fmt(s["load_cv"], 2),
            _fmt(s["router_entropy"], 3),
            f"{_fmt(s['pr_pre_median'], 1)} / {_fmt(s['pr_post_median'], 1)}",
            f"{_fmt(s['gain_median'], 2)} [{_fmt(s['gain_min'], 2)}, {_fmt(s['gain_max'], 2)}]",
            f"{s['gain_above_1']}/{s['measured']}",
            _fmt(s["rho_tokens_pr_post"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def moe_experts(results: dict) -> Finding:
    """Do routed experts reinject variance like a dense FFN, do rarely routed ones collapse, and does Muon's
    higher PR_post hold per expert? (Beyond the paper; numbers at the final evaluation.)"""
    claim = (
        "Beyond the paper (MoE LLaMA, 8 experts top-2, vs a dense LLaMA of the same active FFN parameters): every "
        "routed expert reinjects variance like a dense FFN (PR_post > PR_pre), and Muon's higher PR_post over "
        "AdamW holds per expert."
    )
    runs = results.get(EXPERIMENT, {}).get("runs", {})
    if not all(name in runs and "experts" in runs[name] for name in MOE_RUNS):
        return Finding(claim, "not run", f"needs {EXPERIMENT}/{' and '.join(MOE_RUNS)} with per-expert series")
    summary = {name: expert_summary(runs[name]) for name in MOE_RUNS}
    flags, lines, heads = [], [], []
    for name in MOE_RUNS:
        s, optimizer = summary[name], name.split("-")[1]
        dense = runs.get(f"dense-{optimizer}")
        dense_text = ""
        if dense is not None:
            g = dense_gains(dense)
            dense_text = f"; the dense FFN's per-layer gains: {', '.join(_fmt(x, 2) for x in g)}"
        flags.append(s["measured"] > 0 and s["gain_above_1"] == s["measured"])
        lines.append(
            f"- Variance reinjection, {name}: {s['gain_above_1']}/{s['measured']} experts with a spectrum have "
            f"PR_post > PR_pre; expert PR gain median {_fmt(s['gain_median'], 2)}, range "
            f"[{_fmt(s['gain_min'], 2)}, {_fmt(s['gain_max'], 2)}]{dense_text}."
        )
        heads.append(f"{name} gain > 1 in {s['gain_above_1']}/{s['measured']} experts")
    for name in MOE_RUNS:
        s, rarest = summary[name], summary[name]["rarest"]
        lines.append(
            f"- Rarely routed experts, {name}: assignments per expert {s['tokens_min']} / {s['tokens_median']:g} / "
            f"{s['tokens_max']} (min / median / max of {s['experts']}), {s['dead']} dead, load CV (median over "
            f"layers) {_fmt(s['load_cv'], 2)}; Spearman rho(tokens, PR_post) = {_fmt(s['rho_tokens_pr_post'], 2)}, "
            f"rho(tokens, PR gain) = {_fmt(s['rho_tokens_gain'], 2)} (n = {s['n']}); the rarest expert "
            f"(layer {rarest['layer']}, expert {rarest['expert']}, {rarest['tokens']} tokens) has PR_post "
            f"{_fmt(rarest['pr_post'], 1)} of width {rarest['width']} vs the median {_fmt(s['pr_post_median'], 1)}."
        )
    adamw, muon = summary["moe-adamw"], summary["moe-muon"]
    flags.append(muon["pr_post_median"] > adamw["pr_post_median"])
    loss = {name: runs[name]["final"]["eval_loss"] for name in (*DENSE_RUNS, *MOE_RUNS) if name in runs}
    dense_pr = {name: runs[name]["nerve"]["mean"]["all"]["pr_post"][-1] for name in DENSE_RUNS if name in runs}
    lines.append(
        f"- Muon vs AdamW per expert: median expert PR_post {_fmt(adamw['pr_post_median'], 1)} -> "
        f"{_fmt(muon['pr_post_median'], 1)}, SE_post {_fmt(adamw['se_post_median'], 2)} -> "
        f"{_fmt(muon['se_post_median'], 2)}, PR gain {_fmt(adamw['gain_median'], 2)} -> {_fmt(muon['gain_median'], 2)}"
        f"; dense layer-mean PR_post {_fmt(dense_pr.get('dense-adamw'), 1)} -> {_fmt(dense_pr.get('dense-muon'), 1)}"
        "; eval loss " + ", ".join(f"{name} {_fmt(value)}" for name, value in loss.items()) + "."
    )
    medians = f"{_fmt(adamw['pr_post_median'], 1)} -> Muon {_fmt(muon['pr_post_median'], 1)}"
    heads.append(f"median expert PR_post AdamW {medians}")
    verdict = "supported" if all(flags) else "contradicted" if not any(flags) else "mixed"
    undecided = (
        ""
        if verdict == "supported"
        else "Not every expert or optimizer follows the dense pattern at this scale; more steps, seeds and the "
        "learning rate tuned per optimizer decide whether it holds."
    )
    return Finding(
        claim,
        verdict,
        "Final evaluation, (layer, expert) cells pooled per run; observed at this scale only:\n\n" + "\n".join(lines),
        headline="; ".join(heads),
        undecided=undecided,
    )
