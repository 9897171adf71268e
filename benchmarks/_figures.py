"""Small PNG figures of the benchmark results (matplotlib, Agg backend, imported on use)."""

from __future__ import annotations

from pathlib import Path

DPI = 90  # small files: the figures are for the README, not print


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write and close ``fig``; return ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _label(result: dict, run: str) -> str:
    return result.get("labels", {}).get(run, run)


def trajectories(results: list[dict], path: Path, metrics=("se_pre", "se_post", "pr_pre", "pr_post")) -> Path:
    """Layer-mean eval metrics vs step for every run of ``results`` (one panel per metric)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 2.8))
    for result in results:
        for run, entry in result["runs"].items():
            series = entry["nerve"]
            for ax, metric in zip(axes, metrics):
                ax.plot(series["steps"], series["mean"]["all"][metric], marker=".", label=_label(result, run))
    for ax, metric in zip(axes, metrics):
        ax.set_title(metric)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def per_layer(results: list[dict], path: Path) -> Path:
    """Final per-layer JS, EEE_post and PR_post/PR_pre of every run."""
    plt = _plt()
    panels = (("js", "JS(pre, post)"), ("eee_post", "EEE_post"), ("pr_gain", "PR_post / PR_pre"))
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for result in results:
        for run, entry in result["runs"].items():
            final = {m: entry["nerve"]["per_site"][m][-1] for m in ("js", "eee_post", "pr_pre", "pr_post")}
            final["pr_gain"] = [
                post / pre if pre and post else None for pre, post in zip(final["pr_pre"], final["pr_post"])
            ]
            layers = entry["nerve"]["layers"]
            for ax, (metric, _) in zip(axes, panels):
                ax.plot(layers, final[metric], marker="o", label=_label(result, run))
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def optimizers(result: dict, path: Path) -> Path:
    """Eval loss and PR_post (layer mean) vs step per optimizer run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(7, 2.8))
    for run, entry in result["runs"].items():
        style = "-" if "short" in run else "--"
        axes[0].plot(entry["history"]["step"], entry["history"]["eval_loss"], style, label=_label(result, run))
        axes[1].plot(
            entry["nerve"]["steps"], entry["nerve"]["mean"]["all"]["pr_post"], style, label=_label(result, run)
        )
    axes[0].set_title("eval loss")
    axes[1].set_title("PR_post (layer mean)")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def correlation_scatter(result: dict, run: str, path: Path, metrics=("se_pre", "pr_pre", "se_post", "pr_post")) -> Path:
    """Metric (layer mean) vs eval loss at each evaluation of one run, with the within-run r."""
    plt = _plt()
    entry = result["runs"][run]
    loss = dict(zip(entry["history"]["step"], entry["history"]["eval_loss"]))
    steps = entry["nerve"]["steps"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.0 * len(metrics), 2.8))
    for ax, metric in zip(axes, metrics):
        values = entry["nerve"]["mean"]["all"][metric]
        ax.scatter([loss.get(s) for s in steps], values, c=steps, cmap="viridis", s=14)
        r = entry["correlations"]["mean"]["all"][metric]["r"]
        ax.set_title(f"{metric}: r = {r:.3f}" if r is not None else metric, fontsize=9)
        ax.set_xlabel("eval loss")
    fig.suptitle(f"{result['experiment']} / {_label(result, run)} (colour: step)", fontsize=9)
    return _save(plt, fig, path)


def moe_experts(result: dict, path: Path) -> Path:
    """The ``moe`` experiment at its final evaluation: per expert, PR_pre and PR_post vs the assignments routed
    to it; PR gain per expert vs tokens beside the dense FFN's per-layer gains; eval loss of every run; PR gain
    per layer, experts beside the dense FFN."""
    from _moe import dense_gains, final_cells

    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.0))
    colours = {"adamw": "tab:blue", "muon": "tab:orange"}
    shift = {"adamw": -0.12, "muon": 0.12}
    for run, entry in result["runs"].items():
        optimizer = entry["settings"]["optimizer"]
        colour = colours.get(optimizer, "tab:gray")
        if "experts" in entry:
            cells = [c for c in final_cells(entry) if c["pr_gain"] is not None]
            tokens = [c["tokens"] for c in cells]
            axes[0].scatter(tokens, [c["pr_pre"] for c in cells], s=12, marker="v", color=colour, alpha=0.6,
                            label=f"{_label(result, run)} PR_pre")  # fmt: skip
            axes[0].scatter(tokens, [c["pr_post"] for c in cells], s=12, marker="o", color=colour,
                            label=f"{_label(result, run)} PR_post")  # fmt: skip
            axes[1].scatter(tokens, [c["pr_gain"] for c in cells], s=12, color=colour, label=_label(result, run))
            axes[3].scatter([c["layer"] + shift.get(optimizer, 0) for c in cells], [c["pr_gain"] for c in cells],
                            s=10, color=colour, alpha=0.7, label=_label(result, run))  # fmt: skip
        else:
            for k, gain in enumerate(dense_gains(entry)):
                axes[1].axhline(gain, color=colour, lw=0.8, ls="--", label=_label(result, run) if k == 0 else None)
            layers = entry["nerve"]["layers"]
            axes[3].plot(layers, dense_gains(entry), "x--", color=colour, label=_label(result, run))
        style = "--" if "experts" in entry else "-"
        axes[2].plot(entry["history"]["step"], entry["history"]["eval_loss"], style, color=colour,
                     label=_label(result, run))  # fmt: skip
    axes[0].set_title("per expert: PR_pre (v), PR_post (o)", fontsize=9)
    axes[1].set_title("PR_post / PR_pre per expert (dashed: dense layers)", fontsize=9)
    axes[1].axhline(1.0, color="black", lw=0.5)
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.set_xlabel("assignments routed (eval set)")
    axes[3].set_title("PR gain per layer: experts (o) vs dense FFN (x)", fontsize=9)
    axes[3].axhline(1.0, color="black", lw=0.5)
    axes[3].set_xlabel("layer")
    axes[2].set_title("eval loss", fontsize=9)
    axes[2].set_xlabel("step")
    for ax in axes:
        ax.legend(fontsize=6)
    return _save(plt, fig, path)
