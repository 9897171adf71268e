"""Experiment configs: ``benchmarks/experiments/<name>.json``, one file per experiment, pure data.

A config names the paper section it follows, the task (``lm`` or ``image``), per-preset settings shared
by its runs, and its runs (variant x optimizer x ...). A run may be limited to some presets (the paper's
LLaMA scales exist only in ``paper``) and may carry settings for every preset or for one::

    {"name": "optimizers", "task": "lm", "section": "...", "description": "...",
     "settings": {"paper": {"size": "160m", "dataset": "HuggingFaceFW/fineweb"}},
     "runs": [{"name": "muon-short", "variant": "gpt2-gelu", "settings": {"optimizer": "muon"},
               "preset_settings": {"paper": {"block_size": 512}}}]}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from _settings import PRESET_NAMES, RunSettings, check_keys, resolve

EXPERIMENTS_DIR = Path(__file__).resolve().parent / "experiments"


@dataclass(frozen=True)
class RunSpec:
    name: str  # unique within the experiment; the key of the run in the result file
    variant: str  # nerve_zoo variant
    settings: dict = field(default_factory=dict)  # RunSettings overrides for every preset
    preset_settings: dict = field(default_factory=dict)  # preset -> RunSettings overrides
    presets: Optional[tuple] = None  # presets this run belongs to (None: all)
    label: str = ""  # short label for tables and plots (default: name)


@dataclass(frozen=True)
class Experiment:
    name: str  # file stem; the result file is <name>.<preset>.json
    task: str  # "lm" or "image"
    section: str  # paper section the experiment reproduces
    description: str  # one line for --list and the tables
    runs: tuple  # RunSpec, in table order
    settings: dict = field(default_factory=dict)  # preset -> RunSettings overrides shared by the runs
    baseline: Optional[str] = None  # run the findings compare against (e.g. GELU)

    def runs_for(self, preset: str) -> list[RunSpec]:
        return [run for run in self.runs if run.presets is None or preset in run.presets]

    def resolve(self, run: RunSpec, preset: str, overrides: Optional[dict] = None) -> RunSettings:
        """The full settings of ``run`` under ``preset`` (see _settings for the order); ``overrides`` (run.py
        ``--set``) come last."""
        return resolve(
            preset,
            self.task,
            self.settings.get(preset, {}),
            {"variant": run.variant, **run.settings},
            run.preset_settings.get(preset, {}),
            overrides or {},
        )


def _run_spec(raw: dict, where: str) -> RunSpec:
    check_keys(raw.get("settings", {}), where)
    for preset, overrides in raw.get("preset_settings", {}).items():
        if preset not in PRESET_NAMES:
            raise ValueError(f"{where}: unknown preset {preset!r}")
        check_keys(overrides, where)
    presets = raw.get("presets")
    return RunSpec(
        name=raw["name"],
        variant=raw["variant"],
        settings=raw.get("settings", {}),
        preset_settings=raw.get("preset_settings", {}),
        presets=tuple(presets) if presets is not None else None,
        label=raw.get("label", raw["name"]),
    )


def load_experiment(name_or_path: str | Path) -> Experiment:
    """An experiment by name (a file in ``benchmarks/experiments``) or by path to its JSON file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = EXPERIMENTS_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"no experiment {name_or_path!r}; known: {list_experiments()}")
    raw = json.loads(path.read_text())
    runs = tuple(_run_spec(run, f"{path.name}: run {run.get('name')!r}") for run in raw["runs"])
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path.name}: duplicate run names {names}")
    return Experiment(
        name=raw["name"],
        task=raw["task"],
        section=raw["section"],
        description=raw["description"],
        runs=runs,
        settings=raw.get("settings", {}),
        baseline=raw.get("baseline"),
    )


def list_experiments() -> list[str]:
    """Names of the experiment configs, in file order."""
    return sorted(path.stem for path in EXPERIMENTS_DIR.glob("*.json"))
