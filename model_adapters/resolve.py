"""Turn an adapter's paths into the concrete pre/post modules of one model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn

from .spec import Adapter, ByConfig, ExpertsSpec, FFNSite
from .unwrap import module_index, unwrap_model


class LayerRangeError(ValueError):
    """``layers`` names a block the model does not have."""


@dataclass(frozen=True)
class ResolvedSite:
    """One FFN of one model: the modules to hook and how to read them."""

    site: str  # report name, f"{family}.{layer}", e.g. "ffn.3"
    family: str  # FFNSite.name
    layer: int  # block index
    pre_path: str  # clean dotted path of the pre module (wrappers removed)
    post_path: str
    pre: nn.Module  # its OUTPUT is pre (chunked by pre_chunk)
    post: nn.Module  # its first positional INPUT is post
    pre_chunk: tuple[int, int] | None = None
    kind: str = "dense"  # FFNSite.kind
    stack: str = ""  # FFNSite.stack
    tokens: str = "attention_mask"  # FFNSite.tokens: the token source of the stack
    experts: ExpertsSpec | None = None  # FFNSite.experts (kind "expert": pre and post are the experts module)
    router: nn.Module | None = None  # the router module of ExpertsSpec.router, when it names one


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _containers(index: dict[str, nn.Module], suffix: str) -> list[str]:
    """Clean paths of the ModuleList/Sequential containers whose path ends with ``suffix``."""
    return [
        path
        for path, module in index.items()
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and (path == suffix or path.endswith("." + suffix))
    ]


def _router(index: dict[str, nn.Module], cpath: str, layer: int, site: FFNSite) -> nn.Module | None:
    """The router module of an experts site whose spec names one."""
    if site.experts is None or not site.experts.router:
        return None
    return index.get(_join(cpath, str(layer), site.experts.router))


def _resolve_family(index: dict[str, nn.Module], site: FFNSite) -> list[ResolvedSite]:
    """All blocks of one site family, or [] when no container has the pre and post modules."""
    found: dict[str, list[ResolvedSite]] = {}
    for cpath in _containers(index, site.blocks):
        rows = []
        for layer in range(len(index[cpath])):
            pre_path = _join(cpath, str(layer), site.pre)
            post_path = _join(cpath, str(layer), site.post)
            if pre_path in index and post_path in index:
                rows.append(
                    ResolvedSite(
                        site=f"{site.name}.{layer}",
                        family=site.name,
                        layer=layer,
                        pre_path=pre_path,
                        post_path=post_path,
                        pre=index[pre_path],
                        post=index[post_path],
                        pre_chunk=site.pre_chunk,
                        kind=site.kind,
                        stack=site.stack,
                        tokens=site.tokens,
                        experts=site.experts,
                        router=_router(index, cpath, layer, site),
                    )
                )
        if rows:
            found[cpath] = rows
    if len(found) > 1:
        raise ValueError(
            f"FFN site {site.name!r}: blocks suffix {site.blocks!r} matches several containers "
            f"{sorted(found)}; register an adapter whose `blocks` names one of them exactly."
        )
    return next(iter(found.values()), [])


def resolve_sites(
    model: nn.Module, adapter: Adapter | ByConfig, layers: Iterable[int] | None = None
) -> list[ResolvedSite]:
    """Resolve every site of ``adapter`` on ``model`` (wrappers are looked through).

    Args:
        model: the model, possibly wrapped.
        adapter: where the FFNs are (a ``ByConfig`` picks by the model's config).
        layers: block indices to keep, within each family's own blocks (negative indices count from the
            end of each family; ``[0]`` keeps the first block of the encoder and of the decoder); None keeps all.

    Returns:
        Sites ordered by family (adapter order), then by layer.

    Raises:
        ValueError: a family resolves to nothing (an ``optional`` family that resolves to nothing, such as
            the decoder of ``T5EncoderModel`` or the dense layers of an MoE without any, is left out instead,
            as long as another family resolves); :class:`LayerRangeError` (a ValueError) when ``layers`` names a
            block that no family has.
    """
    name = type(unwrap_model(model)).__name__
    if isinstance(adapter, ByConfig):  # a table entry passed as is: the layout this model's config picks
        adapter = adapter.adapter_for(getattr(unwrap_model(model), "config", None))
    index = module_index(unwrap_model(model))
    sites: list[ResolvedSite] = []
    for family in adapter.sites:
        rows = _resolve_family(index, family)
        if not rows and family.optional:
            continue  # this model has no such stack (or, in an MoE, no such dense layers)
        if not rows:
            raise ValueError(
                f"{name}: no blocks matching {family.blocks!r} contain "
                f"both {family.pre!r} and {family.post!r}; the adapter does not fit this model."
            )
        sites.extend(rows)
    if not sites:
        raise ValueError(f"{name}: none of the adapter's stacks {[f.blocks for f in adapter.sites]} exist here")
    if layers is None:
        return sites
    n_of = {}  # family -> its number of blocks
    for s in sites:
        n_of[s.family] = max(n_of.get(s.family, 0), s.layer + 1)
    n_blocks = max(n_of.values())
    layers = list(layers)
    for layer in layers:
        if not -n_blocks <= layer < n_blocks:
            raise LayerRangeError(
                f"layers={layers}: layer {layer} is out of range; {name} has "
                f"{n_blocks} blocks, so valid layers are 0..{n_blocks - 1} (or -{n_blocks}..-1 from the end)"
            )
    wanted = {family: {layer % n for layer in layers if -n <= layer < n} for family, n in n_of.items()}
    return [s for s in sites if s.layer in wanted[s.family]]
