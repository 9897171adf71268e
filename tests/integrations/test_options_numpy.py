"""NumPy scalars of the right kind are options like Python's own (np.bool_ for a boolean, NumPy integers for
an integer, any NumPy real for a number, a list of NumPy integers for a list of integers): accepted by every
field of NerveConfig and ProbeConfig, at construction and on assignment, and stored as the Python type (so
records and reports serialise them); NumPy values of the wrong kind are refused as Python's are."""

from __future__ import annotations

import json
import typing
from dataclasses import asdict, fields

import numpy as np
import pytest

from nerve_hf import NerveCallback, NerveConfig
from nerve_hf.probe import ProbeConfig

VALID = {  # a valid Python value for fields whose default is None
    "layers": [0, -1],
    "position_buckets": [0, 4],
    "spectra_layers": [0],
    "max_tokens": 64,
    "layers_per_step": 1,
    "memory_budget_mb": 100.0,
    "experts": [0, 1],
    "experts_per_step": 2,
}
AS_NUMPY = {
    bool: lambda v: [np.bool_(v), np.bool_(not v)],
    int: lambda v: [np.int64(v), np.int32(v), np.uint16(v) if v >= 0 else np.int8(v)],
    float: lambda v: [np.float64(v), np.float32(v), np.int64(round(v))],
    list: lambda v: [[np.int64(i) for i in v], tuple(np.int32(i) for i in v), np.array(v)],
}
PYTHON = {bool: bool, int: int, float: float, list: list}


def kind(cls, name):
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if typing.get_origin(hint) is typing.Union else hint
    if typing.get_origin(hint) is list:
        return list if typing.get_args(hint) == (int,) else None  # lists of strings take no NumPy numbers
    return hint


def cases():
    for cls in (NerveConfig, ProbeConfig):
        for f in fields(cls):
            k = kind(cls, f.name)
            if k in AS_NUMPY:
                python = f.default if f.default is not None and not callable(f.default_factory) else VALID[f.name]
                python = python if python is not None else VALID[f.name]
                for value in AS_NUMPY[k](python):
                    yield pytest.param(cls, f.name, k, value, id=f"{cls.__name__}.{f.name}={value!r}")


def test_every_numeric_field_is_covered():
    covered = {(c.values[0].__name__, c.values[1]) for c in cases()}
    for cls in (NerveConfig, ProbeConfig):
        for f in fields(cls):
            if kind(cls, f.name) in (bool, int, float, list):
                assert (cls.__name__, f.name) in covered


@pytest.mark.parametrize("cls,name,k,value", list(cases()))
def test_numpy_scalar_of_the_right_kind_is_accepted(cls, name, k, value):
    required = {"model": "m"} if cls is ProbeConfig else {}
    config = cls(**required, **{name: value})
    stored = getattr(config, name)
    assert type(stored) is PYTHON[k] and all(type(i) is int for i in (stored if k is list else []))
    assert stored == (list(np.asarray(value).tolist()) if k is list else value)
    json.dumps(asdict(config))  # records and reports serialise it
    config = cls(**required)
    setattr(config, name, value)  # assignment after construction the same
    assert type(getattr(config, name)) is PYTHON[k]
    if cls is NerveConfig:
        assert type(getattr(NerveCallback(**{name: value}).config, name)) is PYTHON[k]


@pytest.mark.parametrize(
    "name,value",
    [
        ("measure_train", np.int64(1)),
        ("every_n_steps", np.bool_(True)),
        ("every_n_steps", np.float64(5.0)),
        ("max_tokens", np.float32(64)),
        ("layers", [np.float64(0)]),
        ("layers", np.array([[0, 1]])),
        ("memory_budget_mb", np.bool_(True)),
        ("memory_budget_mb", np.float64("nan")),
    ],
)
def test_numpy_value_of_the_wrong_kind_is_refused(name, value):
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be "):
        NerveConfig(**{name: value})
