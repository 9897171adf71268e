"""See through wrappers (DDP, torch.compile, FSDP, activation checkpointing) to the model's own modules."""

from __future__ import annotations

from torch import nn

# Attribute names under which wrappers keep the module they wrap. They also appear as path segments
# inside a model whose blocks were wrapped (FSDP units, checkpoint_wrapper, a compiled block).
WRAPPER_ATTRS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

# Wrapper classes (by name, to avoid importing optional backends) that keep the model as `.module`.
MODULE_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel", "DeepSpeedEngine")


def unwrap_model(model: nn.Module) -> nn.Module:
    """Peel wrappers off ``model`` until the user's own module remains.

    >>> from torch import nn
    >>> inner = nn.Linear(2, 2)
    >>> unwrap_model(nn.DataParallel(inner)) is inner
    True
    """
    while True:
        inner = None
        if type(model).__name__ in MODULE_WRAPPERS and isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        else:
            for attr in WRAPPER_ATTRS:
                candidate = getattr(model, attr, None) if attr in model._modules else None
                if isinstance(candidate, nn.Module):
                    inner = candidate
                    break
        if inner is None:
            return model
        model = inner


def clean_name(name: str) -> str:
    """Drop wrapper segments from a dotted module path.

    >>> clean_name("h.0._checkpoint_wrapped_module.mlp.c_fc")
    'h.0.mlp.c_fc'
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_ATTRS)


def module_index(model: nn.Module) -> dict[str, nn.Module]:
    """Map every clean module path of ``model`` to its innermost (wrapped) module."""
    index: dict[str, nn.Module] = {}
    # named_modules is pre-order: a wrapped module comes after its wrapper and overwrites it.
    for name, module in model.named_modules():
        index[clean_name(name)] = module
    return index
