"""A training run read back: its NerVE measurements and its losses, aligned step by step.

A run directory is what ``Trainer`` + :class:`nerve_hf.NerveCallback` leave behind: the callback's
``nerve_metrics.jsonl`` and the Trainer's ``trainer_state.json`` (``log_history``). Each measurement is
aligned with the loss logged at the same step of the same split:

* ``train`` spectra (the micro-batches of optimizer step k) with the training ``loss`` logged at step k
  (the Trainer's running mean since its previous log);
* ``eval`` spectra with ``eval_loss`` of the same evaluation (``eval_<name>`` with ``eval_<name>_loss``).

What is built on it: :mod:`nerve_hf.analysis.correlations` (Pearson r with the loss),
:mod:`nerve_hf.analysis.report` (``nerve report``'s files), :mod:`nerve_hf.analysis.compare` (several runs
overlaid) and the figures of :mod:`nerve_hf.analysis.run_plots`.

Notebook use::

    from nerve_hf.analysis import compare, correlations, report, run_plots, runs
    run = runs.load_run("out/run")            # run.metrics, run.losses: DataFrames
    table = runs.aligned(run)                 # one row per (split, step, site) with its loss
    corr = correlations.correlations(table)   # split, site, metric, r, p, n
    run_plots.plot_trajectories(run.metrics, "train", run.losses)
    report.write_report("out/run")            # correlations.csv, summary.md, PNGs
    compare.write_compare(["out/a", "out/b"], "cmp")  # compare.csv, compare_<split>.png: runs overlaid
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from nerve_hf.errors import InputError, requires
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.report import ROW_KEYS
from nerve_hf.sinks.records import RECORDS_FILENAME, scan_records, skipped_lines_message
from nerve_hf.sites import families, family, is_mean, layer_of, mean_name
from nerve_hf.tracking.measurements.flow import FLOW_KEYS

__all__ = ["RunData", "load_run", "aligned", "split_order", "with_layer_mean", "family_means", "splits_without_mean"]

STATE_FILENAME = "trainer_state.json"
_EVAL_LOSS = re.compile(r"^(eval(?:_.+)?)_loss$")  # eval_loss -> eval; eval_code_loss -> eval_code
_LOG_KEY = re.compile(r"^(?:(eval(?:_.+)?)_)?nerve/(.+)/([a-z_]+)$")  # [eval_]nerve/<site>/<metric>


@dataclass
class RunData:
    """A run's measurements and losses as long DataFrames.

    ``metrics``: step, split, site, layer, dim, tokens and the seven metrics (and the variance-flow metrics
    ``se_input``, ..., ``js_post_output`` of a run measured with ``flow=True``); one row per FFN site per
    measurement plus a ``site == "mean"`` row per measurement (the average over sites with the metric
    defined, as logged under ``nerve/mean/...``; ``layer`` is -1, ``tokens`` the mean over sites). A
    measurement with site records missing (a crash during its write) is left out whole.
    ``losses``: step, split, loss.
    """

    run_dir: Path
    metrics: object  # pandas.DataFrame
    losses: object  # pandas.DataFrame
    sources: dict = field(default_factory=dict)  # which files the frames came from


def _state_file(run_dir: Path) -> Optional[Path]:
    """``trainer_state.json`` of the run: its own, else that of its newest checkpoint."""
    if (run_dir / STATE_FILENAME).is_file():
        return run_dir / STATE_FILENAME
    checkpoints = [p for p in run_dir.glob("checkpoint-*") if (p / STATE_FILENAME).is_file() and p.name[11:].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name[11:])) / STATE_FILENAME if checkpoints else None


def _run_folder(path: Path) -> Path:
    """The run directory ``path`` names: itself, or the folder of its records or trainer state file."""
    if path.is_dir():
        return path
    if path.is_file() and path.name in (RECORDS_FILENAME, STATE_FILENAME):
        return path.parent  # RUN/nerve_metrics.jsonl or RUN/trainer_state.json: the run is its folder
    if path.exists():
        raise InputError(f"{str(path)!r} is a file: pass the run directory (the Trainer's output_dir)")
    raise InputError(f"run directory {str(path)!r} does not exist")


def _log_history(state_path: Path) -> list[dict]:
    """``log_history`` of a trainer state: a list of objects whose ``step`` (where given) is an integer."""
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{str(state_path)!r} is not a readable trainer state: {error}") from None
    history = state.get("log_history", []) if isinstance(state, dict) else None
    wrong = None
    if not isinstance(history, list):
        wrong = f"log_history is {type(history).__name__ if isinstance(state, dict) else 'missing'}, not a list"
    else:
        bad = next((e for e in history if not isinstance(e, dict) or not _is_step(e.get("step", 0))), None)
        if bad is not None:
            wrong = f"log_history holds {bad!r}, not an object with an integer step"
    if wrong is not None:
        raise InputError(f"{str(state_path)!r} is not a trainer state: {wrong}")
    return history


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer()


def _losses(log_history: list[dict]) -> list[dict]:
    out = []
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for key, value in entry.items():
            if not isinstance(value, (int, float)):
                continue
            if key == "loss":
                out.append({"step": int(step), "split": "train", "loss": float(value)})
            elif (match := _EVAL_LOSS.match(key)) and "nerve/" not in key:
                out.append({"step": int(step), "split": match.group(1), "loss": float(value)})
    return out


def _records_from_log_history(log_history: list[dict]) -> list[dict]:
    """Per-site records rebuilt from ``nerve/<site>/<metric>`` keys (runs without the JSONL file)."""
    grouped: dict[tuple, dict] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            match = _LOG_KEY.match(key)
            if step is None or not match or match.group(3) not in METRIC_NAMES or is_mean(match.group(2)):
                continue
            split, site = match.group(1) or "train", match.group(2)
            record = grouped.setdefault(
                (int(step), split, site),
                {
                    "step": int(step),
                    "split": split,
                    "site": site,
                    "layer": layer_of(site),
                    "dim": math.nan,
                    "tokens": math.nan,
                },
            )
            record[match.group(3)] = math.nan if value is None else float(value)
    return list(grouped.values())


def _read_records_file(path: Path) -> list[dict]:
    """The records of ``path``, with read_records' warning about unreadable lines; InputError when the file
    is empty or holds no JSON record at all (then without the warning: the error says it all)."""
    scan = scan_records(path)
    if not scan.lines:
        raise InputError(f"records file {str(path)!r} is empty")
    if not scan.records:
        raise InputError(f"records file {str(path)!r} holds no JSON records (is it a NerVE records file?)")
    if scan.skipped:
        warnings.warn(skipped_lines_message(path, scan.skipped), RuntimeWarning, stacklevel=3)
    return scan.records


def _warn_several_runs(records: list[dict], path: Path) -> None:
    """One RuntimeWarning when ``records`` (in file order) come from more than one run (their ``run`` ids;
    records without one count as one unnamed run): it names each run and its steps, and says that where
    two runs measured the same (split, step, site), the later record is the one reported."""
    runs: dict[str, list[int]] = {}
    for record in records:
        runs.setdefault(str(record.get("run") or "(no run id)"), []).append(int(record.get("step", 0)))
    if len(runs) < 2:
        return
    described = ", ".join(f"{run} (steps {min(steps)}-{max(steps)})" for run, steps in runs.items())
    warnings.warn(
        f"{str(path)!r} holds the records of {len(runs)} runs: {described}; where they measured the same "
        f"step the later record is reported. Keep one run's records per file.",
        RuntimeWarning,
        stacklevel=3,
    )


def _complete_steps(metrics, source: str):
    """``metrics`` without its incomplete (split, step) measurements, with one RuntimeWarning naming them.

    A measurement is complete when its number of distinct site records equals its records' ``sites``
    field; records without that field expect the largest number of sites any step of their split has.
    """
    counts = metrics.groupby(["split", "step"], sort=False).agg(found=("site", "nunique"), sites=("sites", "max"))
    largest = counts.groupby(level="split")["found"].transform("max")
    counts["expected"] = counts["sites"].fillna(largest).astype(int)
    incomplete = counts[counts["found"] != counts["expected"]]
    if not len(incomplete):
        return metrics
    warnings.warn(
        f"left out incomplete measurements of {source!r} (records missing after a crash): "
        f"{_describe_incomplete(incomplete)}",
        RuntimeWarning,
        stacklevel=3,
    )
    keys = metrics.set_index(["split", "step"]).index
    return metrics[~keys.isin(incomplete.index)]


def _describe_incomplete(incomplete) -> str:
    """``train step 30 (1 of 2 sites), eval steps 10, 20 (1 of 2 sites)``: splits in report order."""
    groups: dict[tuple, list[int]] = {}
    for (split, step), row in incomplete.iterrows():
        groups.setdefault((split, int(row["found"]), int(row["expected"])), []).append(int(step))
    order = {split: i for i, split in enumerate(split_order(split for split, _, _ in groups))}
    parts = []
    for (split, found, expected), steps in sorted(groups.items(), key=lambda item: (order[item[0][0]], min(item[1]))):
        noun = "step" if len(steps) == 1 else "steps"
        parts.append(f"{split} {noun} {', '.join(map(str, sorted(steps)))} ({found} of {expected} sites)")
    return ", ".join(parts)


def load_run(run_dir) -> RunData:
    """Read a run directory (or one of its ``checkpoint-N`` folders); InputError if it is not one, or if its
    records file is empty or holds no JSON record. Unreadable record lines and incomplete measurements are
    left out, each kind with one RuntimeWarning."""
    with requires("analysis"):
        import pandas as pd

    run_dir = _run_folder(Path(run_dir))
    state_path = _state_file(run_dir)
    if state_path is None:
        raise InputError(
            f"{str(run_dir)!r} has no {STATE_FILENAME} (nor a checkpoint-N/ with one): call trainer.save_state() "
            f"at the end of training, or point at the Trainer's output_dir"
        )
    log_history = _log_history(state_path)

    records_path = run_dir / RECORDS_FILENAME
    last_step = None
    if (
        not records_path.is_file()
        and run_dir.name.startswith("checkpoint-")
        and (run_dir.parent / RECORDS_FILENAME).is_file()
    ):
        records_path = run_dir.parent / RECORDS_FILENAME  # a checkpoint folder: the run's records up to it
        last_step = max((int(e["step"]) for e in log_history if "step" in e), default=None)
    if records_path.is_file():
        records = _read_records_file(records_path)
        _warn_several_runs(records, records_path)
        sources = {"records": str(records_path), "state": str(state_path)}
    else:
        records = _records_from_log_history(log_history)
        sources = {"records": f"{state_path} (nerve/ keys of log_history)", "state": str(state_path)}
    if last_step is not None:
        records = [r for r in records if int(r["step"]) <= last_step]
    if not records:
        raise InputError(
            f"{str(run_dir)!r} holds no NerVE measurements (no {RECORDS_FILENAME}, no nerve/ keys in "
            f"{STATE_FILENAME}): train with callbacks=[nerve_hf.NerveCallback(...)]"
        )

    flow = [key for key in FLOW_KEYS if key != "dim_input" and any(key in r for r in records)]  # flow=True runs
    columns = ["step", "split", *ROW_KEYS, *flow]
    metrics = pd.DataFrame(records).reindex(columns=[*columns, "sites"])
    metrics[list(METRIC_NAMES) + flow] = metrics[list(METRIC_NAMES) + flow].astype(float)
    # A resumed run may have measured a step twice: the last record wins.
    metrics = metrics.drop_duplicates(subset=["step", "split", "site"], keep="last")
    metrics = _complete_steps(metrics, sources["records"])[columns]
    if not len(metrics):
        raise InputError(
            f"every measurement in {sources['records']!r} is incomplete (records missing after a "
            f"crash): nothing to report"
        )
    metrics = with_layer_mean(metrics)

    losses = pd.DataFrame(_losses(log_history), columns=["step", "split", "loss"])
    losses = losses.drop_duplicates(subset=["step", "split"], keep="last").sort_values(["split", "step"])
    return RunData(run_dir=run_dir, metrics=metrics, losses=losses.reset_index(drop=True), sources=sources)


def splits_without_mean(metrics) -> list[str]:
    """The splits whose measurements do not all cover the same set of sites (``layers_per_step`` runs,
    rotating over groups of layers): a mean over them would mix different layers from step to step."""
    per_step = metrics[~metrics["site"].map(is_mean)].groupby(["split", "step"], sort=False)["site"].agg(frozenset)
    kinds = per_step.groupby(level="split", sort=False).nunique()
    return split_order(kinds[kinds > 1].index)


def with_layer_mean(metrics):
    """``metrics`` (per-site rows: step, split, site, layer, kind, dim, tokens, metrics, and the flow metrics
    of a ``flow=True`` run) with a layer-mean row per (split, step) and family of dense FFNs, as logged under
    ``nerve/mean/...``: site ``mean`` for a model with one family, ``mean/<family>`` for each family of a model
    with several (:func:`family_means`); ``layer`` -1, ``tokens`` the mean over sites. Only for splits where
    every step has the same set of sites: a ``layers_per_step`` run measures a different group at each step,
    and has no layer mean (as the callback logs none)."""
    import pandas as pd

    flow = [key for key in FLOW_KEYS if key != "dim_input" and key in metrics.columns]
    columns = ["step", "split", *ROW_KEYS, *flow]
    if "kind" not in metrics:  # records and result files written before kinds: dense
        metrics = metrics.assign(kind="dense")
    rotating = splits_without_mean(metrics)
    same_sites = metrics[~metrics["split"].isin(rotating)]
    kinds = same_sites["kind"]
    dense = same_sites[kinds.isna() | (kinds == "dense")]  # records written before rows had kinds: dense
    mean = family_means(dense, ["split", "step"], [*METRIC_NAMES, *flow])
    frame = pd.concat([metrics[columns], mean[columns]], ignore_index=True)
    return frame.sort_values(["split", "step", "layer", "site"], kind="stable").reset_index(drop=True)


def family_means(dense, by: list[str], names: list[str]):
    """The layer means of ``dense`` (per-site rows of dense FFNs) per group of the ``by`` columns and site
    family, never two families together: columns ``by``, ``names``, ``tokens`` (the mean over sites), ``site``
    (:func:`~nerve_hf.sites.mean_name`: ``mean``, or ``mean/<family>`` where the rows hold several families),
    ``layer`` -1, ``dim`` NaN, ``kind`` ``"dense"``."""
    all_families = families(dense["site"])
    mean = (
        dense.assign(_family=dense["site"].map(family))
        .groupby([*by, "_family"], sort=False)
        .agg({**{name: "mean" for name in names}, "tokens": "mean"})
        .reset_index()
    )
    sites = mean["_family"].map(lambda name: mean_name(name, all_families))
    return mean.drop(columns="_family").assign(site=sites, layer=-1, dim=math.nan, kind="dense")


def aligned(run: RunData):
    """Every measurement with the loss of the same split and step (measurements without one dropped).

    Columns: step, split, site, layer, dim, tokens, the seven metrics, loss.
    """
    return run.metrics.merge(run.losses, on=["split", "step"], how="inner")


def split_order(splits) -> list[str]:
    """The distinct split names in report order: ``train``, ``eval``, then the others alphabetically."""
    return sorted(set(splits), key=lambda s: (s != "train", s != "eval", s))
