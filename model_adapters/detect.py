"""Fallback for models not in the table: find FFN-shaped modules by their structure.

An FFN-shaped module has, among its direct children, a linear up projection ``d -> h``, an elementwise
activation module and, registered after the up projection, a linear down projection ``h -> d``. A second
``d -> h`` projection makes it gated (pre = the one whose name contains "gate", else the first registered).
Only FFNs inside an indexed block container (``ModuleList``/``Sequential``) are sites.

Detection refuses rather than guesses. It never takes:
- a softmax (or any activation that is not elementwise) for the activation;
- a module whose path or class is attention, a router, a norm or a gate of one, or whose projections
  are attention's (``q``/``k``/``v``/``o``, ``*_out`` of attention);
- blocks of a non-text tower (vision, audio, ...): those run on their own inputs with their own token
  source, which only a table entry can name.
"""

from __future__ import annotations

import re

from torch import nn

from .spec import Adapter, FFNSite
from .unwrap import module_index, unwrap_model

_ACTIVATION_NAME = re.compile(r"gelu|relu|silu|swish|mish|tanh|sigmoid|activation|softplus|elu", re.IGNORECASE)
# Activation classes that are not elementwise: a row's values mixed (softmax) or halves combined (GLU).
_NOT_ELEMENTWISE = re.compile(r"softm|logsoftmax|multiheadattention|^glu$|threshold", re.IGNORECASE)
# Path segments or class names of modules that are not FFNs, whatever their shape.
_NOT_FFN = re.compile(r"att(n|ention)|_att$|^att$|router|gating|norm|rotary|conv|ssm|mixer|embed", re.IGNORECASE)
# Child names of attention projections.
_ATTENTION_CHILD = re.compile(r"^(project_)?[qkvo]$|^[qkvo]_proj$|^(query|key|value)$|attention_out|^out_proj$")
# Path segments of towers other than the text stack.
_OTHER_TOWER = re.compile(
    r"vision|visual|image|img|audio|speech|video|patch|pixel|vit|siglip|clip|perceiver|resampler|projector",
    re.IGNORECASE,
)


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a Linear (quantized subclasses included), a GPT-2 style Conv1D, or a
    quantized linear layer that is not an ``nn.Linear`` but says its sizes (GPTQ ``QuantLinear``: ``infeatures``/
    ``outfeatures``; AWQ ``WQLinear_*``, HQQ, EETQ ...: ``in_features``/``out_features``), else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx") and hasattr(module, "nf"):
        return module.nx, module.nf  # transformers.pytorch_utils.Conv1D: weight [in, out]
    if "linear" in type(module).__name__.lower():
        for names in (("in_features", "out_features"), ("infeatures", "outfeatures")):
            sizes = [getattr(module, name, None) for name in names]
            if all(isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes):
                return sizes[0], sizes[1]
    return None


def _is_activation(module: nn.Module) -> bool:
    """An elementwise activation module (GELU, SiLU, ...); never a softmax."""
    cls = type(module)
    if _NOT_ELEMENTWISE.search(cls.__name__):
        return False
    return cls.__module__ in ("torch.nn.modules.activation", "transformers.activations") or bool(
        _ACTIVATION_NAME.search(cls.__name__)
    )


def _not_ffn(path: str, module: nn.Module) -> bool:
    """Attention, a router, a norm ... by its class or a segment of its path."""
    return bool(_NOT_FFN.search(type(module).__name__) or any(_NOT_FFN.search(part) for part in path.split(".")))


def _in_other_tower(path: str, module: nn.Module) -> bool:
    """In a tower other than the text stack (vision, audio, ...), by its class or a segment of its path."""
    return bool(_OTHER_TOWER.search(type(module).__name__) or any(_OTHER_TOWER.search(p) for p in path.split(".")))


def _excluded(path: str, module: nn.Module) -> bool:
    """True for a module detection must not take for an FFN: attention, router, norm, another tower."""
    return _not_ffn(path, module) or _in_other_tower(path, module)


def find_ffn(module: nn.Module) -> tuple[str, str, bool] | None:
    """(pre child name, post child name, gated) when ``module`` is FFN-shaped, else None.

    >>> from torch import nn
    >>> find_ffn(nn.Sequential(nn.Linear(4, 9), nn.GELU(), nn.Linear(9, 4)))
    ('0', '2', False)
    """
    children = list(module.named_children())
    if not any(_is_activation(child) for _, child in children):
        return None
    linears = [(name, dims) for name, child in children if (dims := linear_dims(child)) is not None]
    if any(_ATTENTION_CHILD.search(name) for name, _ in linears):
        return None  # attention's projections, with its softmax or gate between them
    for j in range(len(linears) - 1, 0, -1):  # down projection candidates, last registered first
        down_name, (h, d) = linears[j]
        ups = [name for name, dims in linears[:j] if dims == (d, h)]
        if ups:
            pre = next((name for name in ups if "gate" in name.lower()), ups[0])
            return pre, down_name, len(ups) > 1
    return None


def _split_block_path(path: str, index: dict[str, nn.Module]) -> tuple[str, int, str] | None:
    """Split ``a.layers.3.mlp`` into (``a.layers``, 3, ``mlp``) at the innermost block container."""
    parts = path.split(".")
    for i in range(len(parts) - 1, -1, -1):
        container = ".".join(parts[:i])
        if parts[i].isdigit() and isinstance(index.get(container), (nn.ModuleList, nn.Sequential)):
            return container, int(parts[i]), ".".join(parts[i + 1 :])
    return None


def other_towers(model: nn.Module) -> list[str]:
    """Block containers of towers other than the text stack (vision, audio, ...) that hold FFN-shaped
    modules: what detection leaves out, and what a table entry without that tower does not measure."""
    index = module_index(unwrap_model(model))
    found = {
        split[0]
        for path, module in index.items()
        if _in_other_tower(path, module)
        and not _not_ffn(path, module)
        and find_ffn(module)
        and (split := _split_block_path(path, index))
    }
    return sorted(found)


def detect_adapter(model: nn.Module) -> Adapter | None:
    """Build an adapter from the structure of ``model``; None when no FFN-shaped block is found."""
    index = module_index(unwrap_model(model))
    patterns: dict[tuple[str, str, str, str], bool] = {}  # (container, in-block path, pre, post) -> gated
    for path, module in index.items():
        ffn = None if _excluded(path, module) else find_ffn(module)
        split = _split_block_path(path, index) if ffn else None
        if split is None:
            continue
        container, _, inner = split
        pre, post, gated = ffn
        key = (container, inner, ".".join(p for p in (inner, pre) if p), ".".join(p for p in (inner, post) if p))
        patterns[key] = patterns.get(key, False) or gated
    if not patterns:
        return None
    names = _site_names(list(patterns))
    sites = tuple(
        FFNSite(name=name, blocks=container, pre=pre, post=post)
        for name, (container, _, pre, post) in zip(names, patterns)
    )
    return Adapter(sites=sites, gated=any(patterns.values()))


def _site_names(keys: list[tuple[str, str, str, str]]) -> list[str]:
    """``ffn`` for a single pattern; else the in-block path, qualified by the container if ambiguous."""
    if len(keys) == 1:
        return ["ffn"]
    short = [inner.replace(".", "_") or "ffn" for _, inner, _, _ in keys]
    if len(set(short)) == len(short):
        return short
    return [f"{container}.{inner}".strip(".").replace(".", "_") for container, inner, _, _ in keys]
