"""Checks of an accumulator's state dict before :meth:`~nerve_hf.stats.moments.StreamingMoments.load_state_dict`
changes anything: every field there, integers non-negative, tensors floating, of their shapes and finite."""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["checked_integers", "checked_tensors"]


def checked_integers(
    state: Mapping[str, Any], where: str, integer_keys: Sequence[str], tensor_keys: Iterable[str] = ()
) -> dict[str, int]:
    """``integer_keys`` of an accumulator's state dict as non-negative ints, after checking that these and
    ``tensor_keys`` are all there. Integers may be Python, NumPy or 0-d torch scalars, or integral floats;
    never bools. A problem raises ``ValueError`` starting with ``where`` and naming the field."""
    missing = [key for key in (*integer_keys, *tensor_keys) if key not in state]
    if missing:
        raise ValueError(f"{where} the state has no {', '.join(map(repr, missing))} (keys: {sorted(map(str, state))}).")
    integers = {}
    for key in integer_keys:
        value = state[key]
        scalar = value.item() if isinstance(value, Tensor) and value.ndim == 0 else value
        integral = isinstance(scalar, numbers.Integral) or (
            isinstance(scalar, numbers.Real) and float(scalar).is_integer()
        )
        if isinstance(scalar, bool) or not integral or scalar < 0:
            raise ValueError(f"{where} state[{key!r}] must be a non-negative integer, got {value!r}.")
        integers[key] = int(scalar)
    return integers


def checked_tensors(state: Mapping[str, Any], where: str, shapes: Mapping[str, tuple], count: int) -> None:
    """Check that each ``state[key]`` of ``shapes`` is a floating tensor of that shape, finite when ``count > 0``."""
    for key, shape in shapes.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ValueError(f"{where} state[{key!r}] must be a tensor, got {type(value).__name__}.")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where} state[{key!r}] has shape {tuple(value.shape)}, expected {tuple(shape)}.")
        if not value.is_floating_point():
            raise ValueError(f"{where} state[{key!r}] must be floating point, got {value.dtype}.")
        if count > 0 and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where} state[{key!r}] holds NaN or Inf, but count is {count}.")
