"""Several runs side by side (``nerve report A B ...``): run directories and model-zoo result files read
into one table, ``compare.csv``, and one overlay figure per split."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from nerve_hf.analysis import run_plots
from nerve_hf.analysis.runs import load_run, split_order, with_layer_mean
from nerve_hf.errors import InputError, requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.sites import is_mean

__all__ = ["COMPARE_COLUMNS", "CompareResult", "load_compare_inputs", "compare_table", "write_compare"]

COMPARE_COLUMNS = ["run", "split", "step", "site", "layer", "tokens", *METRIC_NAMES]


@dataclass
class CompareResult:
    """What :func:`write_compare` wrote: ``table`` is ``compare.csv`` (one row per run, split, step, site)."""

    out_dir: Path
    files: list[Path]
    table: object  # pandas.DataFrame
    runs: dict = field(default_factory=dict)  # run name -> metrics DataFrame (with the layer-mean rows)


def _zoo_runs(path: Path) -> dict:
    """The runs of a model-zoo result file (``benchmarks/results/<preset>/<experiment>.json``): name
    ``<experiment>/<run>`` -> metrics DataFrame (split ``eval``: the zoo measures on its eval batches)."""
    with requires("analysis"):
        import pandas as pd

    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{str(path)!r} is not a readable JSON file: {error}") from None
    runs = content.get("runs") if isinstance(content, dict) else None
    if not isinstance(runs, dict) or not runs:
        raise InputError(f"{str(path)!r} is not a model-zoo result file (no 'runs' with NerVE series)")
    out = {}
    experiment = content.get("experiment") or path.stem
    for key, entry in runs.items():
        nerve = entry.get("nerve") if isinstance(entry, dict) else None
        if not isinstance(nerve, dict) or "per_site" not in nerve:
            raise InputError(f"run {key!r} of {str(path)!r} holds no NerVE series ('nerve' with 'per_site')")
        rows = []
        for i, step in enumerate(nerve["steps"]):
            for k, site in enumerate(nerve["sites"]):
                rows.append(
                    {
                        "step": int(step),
                        "split": "eval",
                        "site": site,
                        "layer": int(nerve["layers"][k]),
                        "dim": nerve["dims"][k],
                        "tokens": nerve["tokens"][i],
                        **{
                            name: math.nan if nerve["per_site"][name][i][k] is None else nerve["per_site"][name][i][k]
                            for name in METRIC_NAMES
                        },
                    }
                )
        frame = pd.DataFrame(rows)
        frame[list(METRIC_NAMES)] = frame[list(METRIC_NAMES)].astype(float)
        out[f"{experiment}/{key}"] = with_layer_mean(frame)
    return out


def load_compare_inputs(paths) -> dict:
    """Run name -> metrics DataFrame (as :attr:`nerve_hf.analysis.runs.RunData.metrics`) for run directories
    and model-zoo result files (``*.json``, several runs each). A run directory is named by its folder (with
    its parent when two folders share a name)."""
    loaded: dict = {}
    for spec in paths:
        path = Path(spec)
        if path.is_file() and path.suffix == ".json":
            found = _zoo_runs(path)
        else:
            run = load_run(path)
            name = path.resolve().name
            if name in loaded:
                name = f"{path.resolve().parent.name}/{name}"
            found = {name: run.metrics}
        for name, frame in found.items():
            unique, n = name, 2
            while unique in loaded:
                unique, n = f"{name} ({n})", n + 1
            loaded[unique] = frame
    return loaded


def compare_table(runs: dict):
    """``compare.csv``: every run's per-site measurements, run, split, step, site, layer, tokens, metrics."""
    with requires("analysis"):
        import pandas as pd

    parts = [frame[~frame["site"].map(is_mean)].assign(run=name) for name, frame in runs.items()]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COMPARE_COLUMNS)
    return table[COMPARE_COLUMNS].reset_index(drop=True)


def write_compare(paths, out_dir=None) -> CompareResult:
    """Write ``compare.csv`` and one ``compare_<split>.png`` per split (layer-mean trajectories of every
    run overlaid, and their final per-layer profiles) into ``out_dir`` (default ``./nerve_compare``)."""
    from nerve_hf.sinks.files import check_writable_dir, write_csv, write_figure

    if len(paths) < 1:
        raise InputError("give at least one run directory or model-zoo result file")
    out_dir = check_writable_dir(out_dir if out_dir is not None else "nerve_compare")
    runs = load_compare_inputs(paths)
    table = compare_table(runs)
    files = [write_csv(out_dir / "compare.csv", table)]
    splits = split_order(split for frame in runs.values() for split in frame["split"])
    for split in splits:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", split)
        files.append(write_figure(out_dir / f"compare_{safe}.png", run_plots.plot_compare(runs, split)))
    return CompareResult(out_dir=out_dir, files=files, table=table, runs=runs)
