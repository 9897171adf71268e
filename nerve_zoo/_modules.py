"""Module-surgery helper shared by the zoo's transformations."""

from __future__ import annotations

from typing import Callable

from torch import nn


def replace_modules(
    model: nn.Module,
    predicate: Callable[[str, nn.Module], bool],
    factory: Callable[[nn.Module], nn.Module],
) -> list[str]:
    """Replace every submodule ``m`` (qualified name ``name``) with ``predicate(name, m)`` true by ``factory(m)``.

    Returns the qualified names replaced, in module order. The root module itself is never replaced.
    """
    targets = [(name, module) for name, module in model.named_modules() if name and predicate(name, module)]
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, factory(module))
    return [name for name, _ in targets]
