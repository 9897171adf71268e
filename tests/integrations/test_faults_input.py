"""Bad input a user types, second trial: every case is refused as one line on stderr with exit 2, naming the
flag or file (real processes), and option values of every accepted kind (NumPy scalars too) are taken."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
from fault_helpers import REPO

from nerve_hf.errors import InputError

RUN_CLM = REPO / "scripts" / "run_clm.py"


def run_clm(tmp_path, *args: str, env=None) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(RUN_CLM), "--output_dir", str(tmp_path / "out"), *args]
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = str(REPO)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment)


def one_line(proc, prog: str = "run_clm.py") -> str:
    """The single line on stderr of a process that refused its input with exit 2."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "args,named",
    [
        (["--nerve_every_n_step", "5"], "--nerve_every_n_step"),  # a prefix is not a silent abbreviation
        (["--nerve_evry_n_steps", "5"], "--nerve_evry_n_steps"),
        (["--nerve_site_sharded", "--nerve_cross_layer", "adjacent"], "--nerve_site_sharded"),
        (["--nerve_layers_per_step", "1", "--nerve_log_per_site", "false"], "--nerve_log_per_site"),
        (["--nerve_state_device", "gpu"], "--nerve_state_device"),
        (["--nerve_state_device", ""], "--nerve_state_device"),
    ],
)
def test_run_clm_refuses_a_bad_nerve_flag_in_one_line(tmp_path, args, named):
    line = one_line(run_clm(tmp_path, "--do_train", "--nerve", *args))
    assert named in line
    assert not (tmp_path / "out").exists()  # refused before anything was built


def test_run_clm_suggests_the_flag_meant():
    sys.path.insert(0, str(RUN_CLM.parent))
    try:
        import run_clm as script
    finally:
        sys.path.remove(str(RUN_CLM.parent))
    with pytest.raises(script.ArgumentError, match=r"unknown flag --nerve_evry_n_steps; did you mean --nerve_every"):
        script.parse_args(["--output_dir", "x", "--nerve_evry_n_steps", "5"])
    with pytest.raises(InputError, match=r"^--nerve_cross_layer cannot be measured with --nerve_site"):
        script.parse_args(["--output_dir", "x", "--nerve_site_sharded", "--nerve_cross_layer", "adjacent"])


@pytest.mark.parametrize("inside", [False, True])
def test_run_clm_names_a_cache_folder_that_is_a_file(tmp_path, inside):
    cache = tmp_path / "cache.txt"
    cache.write_text("not a folder")
    env = dict(os.environ, NERVE_HF_CACHE=str(cache / "sub" if inside else cache))
    line = one_line(run_clm(tmp_path, "--do_train", "--max_steps", "1", env=env))
    assert "NERVE_HF_CACHE" in line and str(cache) in line and "not a folder" in line


# ------------------------------------------------------------------ options changed after the Trainer is built
CHANGED = {  # one new valid value per option: every one of them is refused once a Trainer holds the callback
    "layers": [1],
    "max_tokens": 8,
    "flow": False,
    "position_buckets": [0, 4],
    "cross_layer": "adjacent",
    "spectra": "estimate",
    "every_n_steps": 3,
    "measure_train": False,
    "measure_eval": False,
    "log_per_site": False,
    "save_spectra": False,
    "write_jsonl": False,
    "layers_per_step": 1,
    "memory_budget_mb": 1000.0,
    "site_sharded": True,
    "state_device": "cpu",
    "spectra_dtype": "float32",
    "extra_metrics": True,
    "metrics": "pr",
    "experts": [0],
    "experts_per_step": 2,
}


def test_every_option_has_a_change_listed():
    from dataclasses import fields

    from nerve_hf import NerveConfig

    assert set(CHANGED) == {f.name for f in fields(NerveConfig)}


def test_options_changed_after_the_trainer_is_built_are_refused_and_keep_measuring(tmp_path):
    from trainer_helpers import make_trainer

    from nerve_hf import NerveCallback, NerveConfig
    from nerve_hf.sinks.records import read_records

    callback = NerveCallback(every_n_steps=1, flow=False)
    callback.config.max_tokens = 16  # before a Trainer: still free
    trainer = make_trainer(tmp_path, [callback], max_steps=2, eval_strategy="no")
    for name, value in CHANGED.items():
        with pytest.raises(InputError, match=rf"^{name} cannot change: NerveCallback's options are fixed once"):
            setattr(callback.config, name, value)
    with pytest.raises(InputError, match=r"^config cannot change"):
        callback.config = NerveConfig(layers=[1])
    assert callback.config.layers is None and callback.config.max_tokens == 16
    trainer.train()
    records = list(read_records(tmp_path / "nerve_metrics.jsonl"))
    assert sorted((r["step"], r["site"]) for r in records) == [(1, "ffn.0"), (1, "ffn.1"), (2, "ffn.0"), (2, "ffn.1")]
    assert {r["tokens"] for r in records} == {16}


# In-place edits of every list-valued option once the callback is given to a Trainer, each a real edit a
# user could write; each must raise OptionFixedError naming the option, and the value must stay as given.
IN_PLACE_EDITS = {
    "append": lambda v: v.append(1),
    "extend": lambda v: v.extend([1]),
    "insert": lambda v: v.insert(0, 1),
    "remove": lambda v: v.remove(v[0]),
    "pop": lambda v: v.pop(),
    "clear": lambda v: v.clear(),
    "sort": lambda v: v.sort(reverse=True),
    "reverse": lambda v: v.reverse(),
    "setitem": lambda v: v.__setitem__(0, 1),
    "setslice": lambda v: v.__setitem__(slice(0, 1), [1]),
    "delitem": lambda v: v.__delitem__(0),
    "iadd": lambda v: v.__iadd__([1]),
    "imul": lambda v: v.__imul__(2),
}
LIST_VALUES = {"layers": [1, 0], "position_buckets": [0, 4], "experts": [0, 2]}


def test_every_list_valued_option_is_listed():
    import typing
    from dataclasses import fields

    from nerve_hf import NerveConfig

    hints = typing.get_type_hints(NerveConfig)
    kinds = ("list", "dict", "Sequence")
    containers = {f.name for f in fields(NerveConfig) if any(kind in str(hints[f.name]) for kind in kinds)}
    assert containers == set(LIST_VALUES)


@pytest.mark.parametrize("name", sorted(LIST_VALUES))
def test_in_place_edits_of_list_options_after_the_trainer_is_built_are_refused(tmp_path, name):
    from trainer_helpers import make_trainer

    from nerve_hf import NerveCallback

    value = list(LIST_VALUES[name])
    callback = NerveCallback(every_n_steps=1, flow=False, **{name: value})
    value.append(7)  # the caller's own list afterwards is not the option
    kept = list(getattr(callback.config, name))
    assert kept == LIST_VALUES[name]
    make_trainer(tmp_path, [callback], max_steps=1, eval_strategy="no")
    option = getattr(callback.config, name)
    for edit, apply in IN_PLACE_EDITS.items():
        with pytest.raises(InputError, match=rf"^{name} cannot change: NerveCallback's options are fixed once"):
            apply(option)
        assert getattr(callback.config, name) == kept, edit
    with pytest.raises(InputError, match=rf"^{name} cannot change"):
        option += [1]  # the augmented assignment's in-place step raises before any assignment
    assert getattr(callback.config, name) == kept and list(copy.deepcopy(callback.config).__dict__[name]) == kept


def test_copies_of_fixed_options_made_by_dataclasses_are_editable_and_the_original_stays_fixed():
    import dataclasses

    from nerve_hf import NerveConfig
    from nerve_hf.options import FixedList, OptionFixedError

    fixed = FixedList([0, 1], name="layers", reason="the callback is attached")
    with pytest.raises(OptionFixedError, match="layers cannot change"):
        fixed.append(2)
    copy = FixedList(fixed)  # what dataclasses.asdict builds for a list
    copy.append(2)
    copy[0] = 5
    assert copy == [5, 1, 2] and fixed == [0, 1]
    config = NerveConfig(layers=[0, 1])
    config.fix("the callback is attached")
    as_dict = dataclasses.asdict(config)
    as_dict["layers"].append(3)
    assert as_dict["layers"] == [0, 1, 3] and config.layers == [0, 1]
