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
    adequate = [c for c in measured if c["tokens"] >= 2 * c["width"]]  # at least 2F rows for an F x F covariance
    rho_adequate, n_adequate = spearman([c["tokens"] for c in adequate], [c["pr_post"] for c in adequate])
    layers = sorted({c["layer"] for c in cells})
    layer_gain = [median([c["pr_gain"] for c in measured if c["layer"] == layer] or [math.nan]) for layer in layers]
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
        "rho_adequate": rho_adequate,
        "n_adequate": n_adequate,
        "layer_gain_median": layer_gain,
        "pr_post_per_width": median(c["pr_post"] / c["width"] for c in measured) if measured else None,
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
            pairs = zip(s["layer_gain_median"], dense_gains(dense))
            dense_text = "; per layer, median expert gain vs the dense FFN's gain (same optimizer): " + ", ".join(
                f"L{k} {_fmt(e, 2)} vs {_fmt(d, 2)}" for k, (e, d) in enumerate(pairs)
            )
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
            f"rho(tokens, PR gain) = {_fmt(s['rho_tokens_gain'], 2)} (n = {s['n']}), rho(tokens, PR_post) over the "
            f"{s['n_adequate']} experts with at least 2F assignments = {_fmt(s['rho_adequate'], 2)}; the rarest "
            f"expert (layer {rarest['layer']}, expert {rarest['expert']}, {rarest['tokens']} assignments, so PR "
            f"<= {rarest['tokens'] - 1} by rank) has PR_post {_fmt(rarest['pr_post'], 1)} of width {rarest['width']} "
            f"vs the run's median {_fmt(s['pr_post_median'], 1)}."
        )
    adamw, muon = summary["moe-adamw"], summary["moe-muon"]
    flags.append(muon["pr_post_median"] > adamw["pr_post_median"])
    loss = {name: runs[name]["final"]["eval_loss"] for name in (*DENSE_RUNS, *MOE_RUNS) if name in runs}
    dense_pr = {name: runs[name]["nerve"]["mean"]["all"]["pr_post"][-1] for name in DENSE_RUNS if name in runs}
    dense_width = {name: runs[name]["nerve"]["dims"][0] for name in DENSE_RUNS if name in runs}
    per_width = {name: _fmt(dense_pr[name] / dense_width[name], 3) for name in dense_pr}
    lines.append(
        f"- Muon vs AdamW per expert: median expert PR_post {_fmt(adamw['pr_post_median'], 1)} -> "
        f"{_fmt(muon['pr_post_median'], 1)}, SE_post {_fmt(adamw['se_post_median'], 2)} -> "
        f"{_fmt(muon['se_post_median'], 2)}, PR gain {_fmt(adamw['gain_median'], 2)} -> {_fmt(muon['gain_median'], 2)}"
        f"; PR_post / width {_fmt(adamw['pr_post_per_width'], 3)} -> {_fmt(muon['pr_post_per_width'], 3)} (experts, "
        f"median) vs {per_width.get('dense-adamw', 'n/a')} -> {per_width.get('dense-muon', 'n/a')} (dense, layer "
        f"mean); dense layer-mean PR_post {_fmt(dense_pr.get('dense-adamw'), 1)} -> "
        f"{_fmt(dense_pr.get('dense-muon'), 1)}"
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
    text = "Final evaluation, (layer, expert) cells pooled per run; observed at this scale only:\n\n" + "\n".join(lines)
    return Finding(
        claim,
        verdict,
        text + "\n\n" + summary_paragraph(runs, summary, loss),
        headline="; ".join(heads),
        undecided=undecided,
    )


def summary_paragraph(runs: dict, summary: dict, loss: dict) -> str:
    """The finding in words, every comparison read from the numbers above it."""
    parts = []
    for name in MOE_RUNS:
        s, optimizer = summary[name], name.split("-")[1]
        dense = runs.get(f"dense-{optimizer}")
        if dense is None or not s["measured"]:
            continue
        gains = dense_gains(dense)
        share, dense_share = s["gain_above_1"] / s["measured"], sum(g > 1 for g in gains) / len(gains)
        relation = "less often than" if share < dense_share else "as often as or more often than"
        parts.append(
            f"with {optimizer} {s['gain_above_1']}/{s['measured']} experts, {relation} the dense FFN's layers "
            f"({sum(g > 1 for g in gains)}/{len(gains)})"
        )
    text = "In words, at this scale: a routed expert reinjects variance (PR_post > PR_pre) " + "; ".join(parts) + ". "
    rare, all_kept = [], True
    for name in MOE_RUNS:
        s = summary[name]
        rarest = s["rarest"]
        kept = rarest["pr_post"] >= 0.5 * s["pr_post_median"]
        all_kept = all_kept and kept and s["dead"] == 0
        rare.append(
            f"{name}: {s['dead']} dead, rarest expert {rarest['tokens']} assignments with PR_post "
            f"{_fmt(rarest['pr_post'], 1)} ({'at least' if kept else 'below'} half the median "
            f"{_fmt(s['pr_post_median'], 1)}), rho(tokens, PR_post) {_fmt(s['rho_tokens_pr_post'], 2)}"
        )
    rising = all((summary[name]["rho_tokens_pr_post"] or 0) > 0 for name in MOE_RUNS)
    text += (
        "Routing is uneven without a load-balancing loss; "
        + (
            "more-routed experts have the higher PR_post"
            if rising
            else "PR_post does not rise with routing in every run"
        )
        + (
            ", but no expert is dead or collapsed"
            if all_kept
            else ", and some rarely routed expert is dead or collapsed"
        )
        + " ("
        + "; ".join(rare)
        + "); a rank-limited sample caps a rare expert's PR at its assignments, so this says how rare experts "
        "are measured as much as how they are trained. "
    )
    adamw, muon = summary["moe-adamw"], summary["moe-muon"]
    best = min(loss, key=loss.get)
    raises = muon["pr_post_median"] > adamw["pr_post_median"]
    dense_pr = [runs[name]["nerve"]["mean"]["all"]["pr_post"][-1] for name in DENSE_RUNS if name in runs]
    dense_note = ""
    if len(dense_pr) == 2:
        dense_up = dense_pr[1] > dense_pr[0]
        dense_note = (
            f" {'as' if dense_up == raises else 'unlike'} it {'does' if dense_up else 'does not'} for the dense FFN"
        )
    lower = "lower" if muon["gain_median"] < adamw["gain_median"] else "not lower"
    steps = runs["moe-adamw"]["provenance"]["steps"]
    text += (
        f"Muon {'raises' if raises else 'does not raise'} the experts' PR_post (median "
        f"{_fmt(adamw['pr_post_median'], 1)} -> {_fmt(muon['pr_post_median'], 1)}){dense_note}, its per-expert PR "
        f"gain is {lower} ({_fmt(adamw['gain_median'], 2)} -> {_fmt(muon['gain_median'], 2)}), and the lowest eval "
        f"loss of the {len(loss)} runs is {best}'s ({_fmt(loss[best])}). One seed and {steps} steps: observations "
        "at this scale, not laws."
    )
    return text
