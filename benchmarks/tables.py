#!/usr/bin/env python
"""Turn benchmark result files into ``benchmarks/results/README.md``: tables beside the paper's numbers,
findings checked on our runs, and a few small figures.

    python benchmarks/tables.py                       # results/cpu/*.json -> results/README.md + results/figures/
    python benchmarks/tables.py --preset cpu cpu-long   # both presets in one README, one section each
    python benchmarks/tables.py --preset smoke --results /tmp/r --output /tmp/r/README.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _findings import check_all  # noqa: E402
from _moe import experts_table  # noqa: E402
from _paper import PAPER_PERPLEXITY, PAPER_REFERENCE, PAPER_WIDTH_R_RANGE, PAPER_WITHIN_RUN_R  # noqa: E402
from _results import REPLICATES, replicate_seed, scaled_loss_note  # noqa: E402
from _settings import PRESETS, run_settings, settings_differences  # noqa: E402

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results"
# what "tiny" means in each preset's scale warning (any other preset gets the cpu one)
SCALE = {
    "cpu": "d = 64, 4 blocks, a few hundred steps on CPU",
    "cpu-long": "d = 128, 4 blocks, 2,000 steps on CPU",
    "gpu-short": "d = 384, 6 blocks, 1,000 steps on one GPU",
}
METRIC_PAIRS = (("se_pre", "se_post", "SE"), ("pr_pre", "pr_post", "PR"), ("eee_pre", "eee_post", "EEE"))


def load_results(results_dir: Path, preset: str) -> dict:
    """experiment name -> result dict, for every ``<results_dir>/<preset>/*.json``; an experiment's seed
    replicates (``<preset>/seeds/*.json``) come under its ``"replicates"``, in seed order."""
    out = {}
    for path in sorted((Path(results_dir) / preset).glob("*.json")):
        result = json.loads(path.read_text())
        out[result["experiment"]] = result
    replicates = []
    for path in (Path(results_dir) / preset / REPLICATES).glob("*.json"):
        replicate = json.loads(path.read_text())
        if replicate["runs"] and replicate["experiment"] in out:  # a file of no runs replicates nothing
            check_replicate(out[replicate["experiment"]], replicate, path)
            replicates.append(replicate)
    for replicate in sorted(replicates, key=replicate_seed):
        out[replicate["experiment"]].setdefault("replicates", []).append(replicate)
    return out


def check_replicate(result: dict, replicate: dict, path: Path) -> None:
    """A seed replicate's runs must differ from the same runs of the experiment's file in the seed alone:
    anything else (another learning rate, preset or corpus) would be compared as if it were seed noise."""
    for name, entry in replicate["runs"].items():
        if name not in result["runs"]:
            continue
        differ = settings_differences(run_settings(result["runs"][name]["settings"]), run_settings(entry["settings"]))
        differ.pop("seed", None)
        if differ or replicate.get("preset") != result.get("preset"):
            shown = ", ".join(f"{key}: {a!r} vs {b!r}" for key, (a, b) in differ.items()) or "another preset"
            raise ValueError(
                f"{path}: run {name} differs from {result['experiment']}'s in more than its seed ({shown})"
            )


def fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "–"
    return f"{x:.{digits}f}"


def label(result: dict, run: str) -> str:
    return result.get("labels", {}).get(run, run)


def summary_table(result: dict) -> str:
    """Per run: parameters, steps, final eval loss and PPL (or accuracy), the paper's PPL, final layer-mean metrics."""
    lm = result["task"] == "lm"
    paper = PAPER_PERPLEXITY.get(result["experiment"], {})
    head = ["run", "params", "optimizer (lr)", "steps", "wall s", "eval loss", "PPL" if lm else "accuracy"]
    if lm and paper:
        head.append("paper PPL")
    head += ["SE pre/post", "PR pre/post", "EEE pre/post", "JS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, entry in result["runs"].items():
        final, prov = entry["final"], entry["provenance"]
        mean = {m: values[-1] for m, values in entry["nerve"]["mean"]["all"].items()}
        opt = f"{entry['settings']['optimizer']} ({entry['settings']['learning_rate']:g})"
        cells = [
            label(result, run),
            f"{prov['parameters'] / 1e6:.2f}M",
            opt,
            str(prov["steps"]),
            f"{prov['wall_time_s']:.0f}",
            fmt(final["eval_loss"]),
            fmt(final.get("perplexity"), 2) if lm else fmt(final.get("accuracy")),
        ]
        if lm and paper:
            cells.append(fmt(paper.get(run), 3 if paper.get(run, 100) < 10 else 2))
        cells += [
            f"{fmt(mean['se_pre'], 2)} / {fmt(mean['se_post'], 2)}",
            f"{fmt(mean['pr_pre'], 1)} / {fmt(mean['pr_post'], 1)}",
            f"{fmt(mean['eee_pre'])} / {fmt(mean['eee_post'])}",
            fmt(mean["js"], 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correlation_table(result: dict) -> str:
    """Within-run Pearson r (layer mean) of each metric with eval loss; the paper's r where it reports one."""
    head = (
        ["run", "n"]
        + [f"{name} pre/post" for _, _, name in METRIC_PAIRS]
        + ["JS", "late n", "late SE pre/post", "late PR pre/post"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, entry in result["runs"].items():
        corr = entry["correlations"]["mean"]["all"]
        late = entry["correlations"]["late"]["mean"]
        cells = [label(result, run), str(corr["se_pre"]["n"])]
        cells += [f"{fmt(corr[pre]['r'])} / {fmt(corr[post]['r'])}" for pre, post, _ in METRIC_PAIRS]
        cells += [fmt(corr["js"]["r"]), str(late["se_pre"]["n"])]
        cells += [f"{fmt(late[pre]['r'])} / {fmt(late[post]['r'])}" for pre, post, _ in METRIC_PAIRS[:2]]
        lines.append("| " + " | ".join(cells) + " |")
        if result["experiment"] == "gpt2_activations" and run in PAPER_WITHIN_RUN_R:
            paper = PAPER_WITHIN_RUN_R[run]
            cells = [f"*paper {label(result, run)}*", ""] + [
                f"*{fmt(paper[pre])} / {fmt(paper[post])}*" for pre, post, _ in METRIC_PAIRS
            ]
            cells += ["", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_layer_table(result: dict) -> str:
    """Final per-layer metrics of every run (site rows)."""
    head = ["run", "site", "D", "SE pre/post", "PR pre/post", "PR gain", "EEE pre/post", "JS", "r(SE_pre)", "r(PR_pre)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, entry in result["runs"].items():
        nerve, corr = entry["nerve"], entry["correlations"]["per_site"]
        for k, site in enumerate(nerve["sites"]):
            v = {m: nerve["per_site"][m][-1][k] for m in nerve["per_site"]}
            gain = v["pr_post"] / v["pr_pre"] if v["pr_pre"] and v["pr_post"] else None
            lines.append(
                "| "
                + " | ".join(
                    [
                        label(result, run),
                        site,
                        str(nerve["dims"][k]),
                        f"{fmt(v['se_pre'], 2)} / {fmt(v['se_post'], 2)}",
                        f"{fmt(v['pr_pre'], 1)} / {fmt(v['pr_post'], 1)}",
                        fmt(gain, 2),
                        f"{fmt(v['eee_pre'])} / {fmt(v['eee_post'])}",
                        fmt(v["js"], 4),
                        fmt(corr["se_pre"][k]),
                        fmt(corr["pr_pre"][k]),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def family_table(result: dict) -> str:
    """Final metrics per FFN family (the Mixer's token-mixing FFN1 and channel-mixing FFN2), layer means."""
    groups = [g for g in next(iter(result["runs"].values()))["nerve"]["mean"] if g != "all"]
    head = ["run"] + [f"{g} {m}" for g in groups for m in ("SE pre/post", "PR pre/post", "JS")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, entry in result["runs"].items():
        cells = [label(result, run)]
        for g in groups:
            v = {m: values[-1] for m, values in entry["nerve"]["mean"][g].items()}
            cells += [
                f"{fmt(v['se_pre'], 2)} / {fmt(v['se_post'], 2)}",
                f"{fmt(v['pr_pre'], 1)} / {fmt(v['pr_post'], 1)}",
                fmt(v["js"], 4),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def width_note(result: dict) -> str:
    lo, hi = PAPER_WIDTH_R_RANGE
    parts = []
    for run, entry in result["runs"].items():
        corr, late = entry["correlations"]["mean"]["all"], entry["correlations"]["late"]["mean"]
        parts.append(
            f"{label(result, run)}: r(SE_pre) = {fmt(corr['se_pre']['r'])} (late {fmt(late['se_pre']['r'])}), "
            f"r(PR_pre) = {fmt(corr['pr_pre']['r'])} (late {fmt(late['pr_pre']['r'])})"
        )
    return (
        f"Paper: across FFN widths, r(SE_pre) and r(PR_pre) lie in [{lo}, {hi}]. Ours, all evaluations "
        f"(second half of training): " + "; ".join(parts) + "."
    )


def figure_plan(results: dict, figures_dir: Path) -> list[tuple[Path, object]]:
    """``(path, draw)`` of every figure the results allow, in README order; ``draw()`` writes the PNG."""
    import functools

    import _figures

    plan = []
    trajectory_results = [results[name] for name in ("gpt2_activations", "gpt2_normfree") if name in results]
    if trajectory_results:
        for stem, draw in (("trajectories", _figures.trajectories), ("per_layer", _figures.per_layer)):
            path = figures_dir / f"{stem}.png"
            plan.append((path, functools.partial(draw, trajectory_results, path)))
    if "optimizers" in results:
        path = figures_dir / "optimizers.png"
        plan.append((path, functools.partial(_figures.optimizers, results["optimizers"], path)))
    if "gpt2_activations" in results and "gelu" in results["gpt2_activations"]["runs"]:
        path = figures_dir / "correlation_gelu.png"
        plan.append((path, functools.partial(_figures.correlation_scatter, results["gpt2_activations"], "gelu", path)))
    if any("experts" in entry for entry in results.get("moe", {}).get("runs", {}).values()):
        path = figures_dir / "moe_experts.png"
        plan.append((path, functools.partial(_figures.moe_experts, results["moe"], path)))
    return plan


def make_figures(results: dict, figures_dir: Path) -> list[Path]:
    figures_dir.mkdir(parents=True, exist_ok=True)
    return [draw() for _, draw in figure_plan(results, figures_dir)]


def corpus_line(result: dict) -> str | None:
    """One line naming the data (corpus fingerprint) and the commit of a result file; None for files written
    before fingerprints were recorded."""
    corpora = result.get("corpora")
    if not corpora:
        return None
    parts = []
    for fp in corpora.values():
        text = f"`{fp.get('corpus')}` id `{fp.get('id')}`"
        if "files" in fp:
            text += f", {fp['files']:,} files, {fp['bytes'] / 1e6:.1f} MB, file-list sha256 `{fp['files_sha256'][:12]}`"
            text += f", Python {fp.get('python')}"
        elif "train_images" in fp:
            text += f", {fp['train_images']:,} + {fp['eval_images']:,} images, sha256 `{fp['content_sha256'][:12]}`"
        packages = {k: v for k, v in (fp.get("packages") or {}).items() if v}
        if packages:
            main = ", ".join(f"{k} {packages[k]}" for k in ("torch", "transformers", "numpy") if k in packages)
            text += f", {len(packages)} packages ({main}, ...)"
        if "packed" in fp:
            text += f", packed as {fp['packed']['tokens']['train']:,} train tokens"
        if "recorded" in fp:  # benchmarks/fingerprint_results.py, after checking the rebuilt data
            text += " (fingerprinted after the runs from the data their settings rebuild)"
        parts.append(text)
    return f"Corpus: {'; '.join(parts)}. {commit_text(result)}."


def commit_text(result: dict) -> str:
    """``Commit: `abc` `` for a file whose runs share the commit of its environment; with runs trained at
    several commits (``--resume`` calls), each commit and its runs."""
    env = result.get("environment", {})

    def name(commit, dirty) -> str:
        return f"`{commit[:10] if commit else 'unknown'}`" + (" (with local changes)" if dirty else "")

    by_commit: dict[str, list[str]] = {}
    for run, entry in result["runs"].items():
        prov = entry["provenance"]
        key = name(prov.get("git_commit", env.get("git_commit")), prov.get("git_dirty", env.get("git_dirty")))
        by_commit.setdefault(key, []).append(label(result, run))
    if len(by_commit) <= 1:
        return f"Commit: {next(iter(by_commit), name(env.get('git_commit'), env.get('git_dirty')))}"
    return "Commits: " + "; ".join(f"{key} ({', '.join(runs)})" for key, runs in by_commit.items())


def render(results: dict, preset: str, figures: list[Path], output: Path, section: bool = False) -> str:
    """The README text of one preset; ``section``: as one section of a README of several (its opening line
    then names the result files only, the README's own opening names the command)."""
    source = (
        f"From `{preset}/*.json`"
        if section
        else f"Generated by `python benchmarks/tables.py --preset {preset}` from `{preset}/*.json`"
    )
    out = [
        f"# NerVE model-zoo results (`{preset}` preset)",
        "",
        f"{source} "
        f"(made by `python benchmarks/run.py EXPERIMENT --preset {preset}`; exact commands in `benchmarks/README.md`). "
        f"Paper numbers: {PAPER_REFERENCE}. Metrics are eval-set spectra (layer mean unless a site is named) at the "
        "final evaluation; r is the within-run Pearson correlation of a metric with eval loss across evaluations "
        "(n of them); *late* r uses only the evaluations of the second half of training.",
        "",
    ]
    if preset != "paper":
        out += [
            f"**Scale warning.** These runs are tiny ({SCALE.get(preset, SCALE['cpu'])}) next to the paper's "
            "125M-1.3B models trained for tens of thousands of steps; perplexities are on a different corpus and "
            "tokenizer and are NOT comparable with the paper's column. Compare orderings and signs, not values.",
            "",
        ]
    note = scaled_loss_note(results)
    if note:
        out += [note, ""]
    out += ["## Findings checked at this scale", ""]
    for finding in check_all(results):
        out += [f"### {finding.claim}", "", f"**Verdict: {finding.verdict}.**", "", finding.evidence, ""]
    for name, result in results.items():
        env = result["environment"]
        first = next(iter(result["runs"].values()), None)
        out += [f"## {name}: {result['description']}", "", f"{result['section']}.", ""]
        if first is None:
            out += ["(no runs)", ""]
            continue
        s, prov = first["settings"], first["provenance"]
        data = (
            f"{prov.get('dataset')}, {prov.get('tokenizer')}, context {s['block_size']}, "
            f"{s['batch_size']}x{s['grad_accum']} sequences/step"
            if result["task"] == "lm"
            else f"{prov.get('dataset')}, {s['image_size']}px, batch {s['batch_size']}"
        )
        out += [
            f"Data: {data}; wd {s['weight_decay']:g}, {s['scheduler']} schedule (first run; every run's settings "
            f"are in the result file); "
            f"seed {s['seed']}; torch {env['torch']}, transformers {env['transformers']}, "
            f"{env['torch_threads']} thread(s).",
            "",
            *([corpus_line(result), ""] if corpus_line(result) else []),
            summary_table(result),
            "",
            "Within-run r with eval loss:",
            "",
            correlation_table(result),
            "",
        ]
        if name == "gpt2_width":
            out += [width_note(result), ""]
        if any("experts" in entry for entry in result["runs"].values()):
            out += [
                "Routed experts at the final evaluation, the (layer, expert) cells of each MoE run pooled (the "
                "`experts.L` sites of the other tables are assignment-weighted means over a layer's experts):",
                "",
                experts_table(result),
                "",
            ]
        if len(first["nerve"]["mean"]) > 1:
            out += ["Per FFN family (final evaluation, layer means):", "", family_table(result), ""]
        out += [
            "<details><summary>per-layer metrics at the final evaluation</summary>",
            "",
            per_layer_table(result),
            "",
            "</details>",
            "",
        ]
    if figures:
        out += ["## Figures", ""]
        out += [f"![{path.stem}]({path.relative_to(output.parent).as_posix()})" for path in figures]
        out.append("")
    return "\n".join(out)


def findings_across_presets(sections: list[tuple[str, dict, list[Path]]]) -> list[str]:
    """Markdown lines: one table with a row per finding (the paper's claim, then each preset's verdict and
    numbers), then, for every finding a preset does not support, what its data show and what would decide it."""
    names = [preset for preset, _, _ in sections]
    checked = {preset: check_all(results) for preset, results, _ in sections}
    head = ["finding", "paper"] + [f"`{preset}` ({SCALE.get(preset, SCALE['cpu'])})" for preset in names]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in zip(*(checked[preset] for preset in names)):
        cells = [row[0].topic, row[0].paper] + [f"**{f.verdict}**: {f.headline}" for f in row]
        out.append("| " + " | ".join(cells) + " |")
    open_ones = [(preset, f) for preset in names for f in checked[preset] if f.undecided]
    if open_ones:
        out += ["", "Where a preset does not support a finding, what its data show and what would decide it:", ""]
        out += [f"- **{f.topic}**, `{preset}` ({f.verdict}): {f.undecided}" for preset, f in open_ones]
    out += [
        "",
        "The collapse phase of a run ends at its evaluation with the lowest layer-mean SE_pre "
        "(`benchmarks/_stats.py: collapse_end`), found in each run's data, not chosen by eye; *evenly spaced* keeps "
        "the evaluations at multiples of `eval_every`, leaving out a dense opening. Each preset's section below "
        "has the full tables.",
    ]
    return out


def render_presets(sections: list[tuple[str, dict, list[Path]]], output: Path) -> str:
    """One README for several presets: the findings side by side (:func:`findings_across_presets`), then
    ``(preset, results, figures)`` each as a ``## `preset` preset`` section holding :func:`render`'s text one
    heading level down. One preset: exactly :func:`render`."""
    if len(sections) == 1:
        preset, results, figures = sections[0]
        return render(results, preset, figures, output)
    names = [preset for preset, _, _ in sections]
    out = [
        f"# NerVE model-zoo results ({', '.join(f'`{p}`' for p in names)} presets)",
        "",
        f"Generated by `python benchmarks/tables.py --preset {' '.join(names)}` from `PRESET/*.json`, one section "
        "per preset (the same tables and finding checks for each; exact commands in `benchmarks/README.md`). "
        f"Paper: {PAPER_REFERENCE}.",
        "",
        "## Findings across scales",
        "",
        *findings_across_presets(sections),
        "",
    ]
    for preset, results, figures in sections:
        body = render(results, preset, figures, output, section=True).split("\n")[1:]  # title: the section's
        out += [f"## `{preset}` preset"] + [("#" + line) if line.startswith("#") else line for line in body]
    return "\n".join(out)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="results directory holding PRESET/*.json")
    parser.add_argument(
        "--preset",
        nargs="+",
        default=None,
        help="preset(s) whose result files to tabulate, in README order (default: every preset but smoke with "
        "result files, in the order of _settings.PRESETS); figures of the first go to figures/, of the others "
        "to figures/PRESET/",
    )
    parser.add_argument("--output", default=None, help="markdown file to write (default: RESULTS/README.md)")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    output = Path(args.output) if args.output else Path(args.results) / "README.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    presets = args.preset or [  # smoke, the quick check of run.py's default, only when named
        name for name in PRESETS if name != "smoke" and any((Path(args.results) / name).glob("*.json"))
    ]
    if not presets:
        parser.error(f"no result files in any preset folder of {args.results}")
    sections = []
    for k, preset in enumerate(presets):
        results = load_results(Path(args.results), preset)
        if not results:
            parser.error(f"no result files in {Path(args.results) / preset}")
        figures_dir = output.parent / "figures" / ("" if k == 0 else preset)
        figures = [] if args.no_figures else make_figures(results, figures_dir)
        sections.append((preset, results, figures))
    output.write_text(render_presets(sections, output))
    made = sum(len(figures) for _, _, figures in sections)
    print(f"wrote {output}" + (f" and {made} figures" if made else ""))
    return output


if __name__ == "__main__":
    main()
