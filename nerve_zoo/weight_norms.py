"""FFN weight geometry (NerVE §3.3): WNorm, SNorm and HNorm on the up/down projections.

All three are ``torch.nn.utils.parametrize`` parametrisations, so the module keeps its class and
forward (the FFN tracker's hooks still find ``mlp.c_fc`` / ``mlp.c_proj``) and ``module.weight`` is the
normalised weight:

- ``weight``: weight normalisation (Salimans & Kingma, 2016), ``W = g * V / ||V||`` per output unit.
- ``spectral``: spectral normalisation (Miyato et al., 2018), ``W = V / sigma_max(V)`` (power iteration).
- ``hyperspherical``: every output unit's weight vector has unit L2 norm (Liu et al., 2017).

Axis convention. ``nn.Linear`` stores ``[out, in]``; GPT-2's ``Conv1D`` stores ``[in, out]`` (it computes
``x @ W``). "Per output unit" therefore means dim 0 of a Linear weight and dim 1 of a Conv1D weight; the
``_OUTPUT_AXIS`` table picks it from the module type. HNorm normalises over the *input* axis so that
each output unit's weight vector (a column of a Conv1D weight) is a unit vector, as in the paper's code
(``F.normalize(weight, dim=0)`` on ``[in, out]``). The paper's code applies ``weight_norm`` with its
default ``dim=0`` to a ``[in, out]`` weight, i.e. one gain per *input* unit; we use one gain per output
unit, the textbook definition.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from transformers.pytorch_utils import Conv1D

# module type -> axis of `weight` indexed by output unit
_OUTPUT_AXIS: dict[type, int] = {nn.Linear: 0, Conv1D: 1}


def output_axis(module: nn.Module) -> int:
    for module_type, axis in _OUTPUT_AXIS.items():
        if isinstance(module, module_type):
            return axis
    raise ValueError(
        f"no output-axis convention for {type(module).__name__}; known: {[t.__name__ for t in _OUTPUT_AXIS]}"
    )


class UnitNorm(nn.Module):
    """Parametrisation ``W -> W / ||W||_2`` along ``dim`` (the reduced axis)."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.dim = dim  # axis summed over in the norm: the input axis for unit-norm output units
        self.eps = eps  # guards an all-zero vector

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / weight.norm(dim=self.dim, keepdim=True).clamp_min(self.eps)


def hyperspherical_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Register HNorm on ``module.<name>``: each output unit's weight vector has unit norm."""
    input_axis = 1 - output_axis(module)
    parametrize.register_parametrization(module, name, UnitNorm(dim=input_axis))
    return module


def _weight_norm(module: nn.Module) -> nn.Module:
    return weight_norm(module, name="weight", dim=output_axis(module))


def _spectral_norm(module: nn.Module) -> nn.Module:
    # sigma_max does not depend on the axis order; dim only sets how the power iteration reshapes
    return spectral_norm(module, name="weight", dim=output_axis(module))


# kind -> function that registers the parametrisation on one projection module
FFN_WEIGHT_NORMS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "weight": _weight_norm,
    "spectral": _spectral_norm,
    "hyperspherical": hyperspherical_norm,
}


def apply_ffn_weight_norm(model: nn.Module, kind: str, projections: tuple[str, ...] = ("c_fc", "c_proj")) -> list[str]:
    """Parametrise the FFN projections of every GPT-2 block (``transformer.h[i].mlp.<projection>``).

    Returns the qualified names of the parametrised modules.
    """
    if kind not in FFN_WEIGHT_NORMS:
        raise ValueError(f"unknown FFN weight norm {kind!r}; choose one of {sorted(FFN_WEIGHT_NORMS)}")
    register = FFN_WEIGHT_NORMS[kind]
    transformer = getattr(model, "transformer", model)
    names = []
    for index, block in enumerate(transformer.h):
        for projection in projections:
            register(getattr(block.mlp, projection))
            names.append(f"h.{index}.mlp.{projection}")
    return names
