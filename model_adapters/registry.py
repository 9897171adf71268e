"""The architecture table and its lookup: user argument, then table, then structure, then an error."""

from __future__ import annotations

from torch import nn

from . import bert, functional, fused, gpt, llama, moe, multimodal, seq2seq, text, timm_mixer, vision
from .detect import detect_adapter
from .refusals import REFUSALS
from .spec import Adapter, ByConfig
from .unwrap import unwrap_model

# key -> Adapter (or ByConfig, when the layout depends on the config). Keys are `config.model_type` for
# transformers models and the class name for others (timm). A fresh dict per import; `register_adapter` adds to it.
_REGISTRY: dict[str, Adapter | ByConfig] = {}
_REGISTRY.update(gpt.ADAPTERS)
_REGISTRY.update(llama.ADAPTERS)
_REGISTRY.update(bert.ADAPTERS)
_REGISTRY.update(timm_mixer.ADAPTERS)
_REGISTRY.update(fused.ADAPTERS)
_REGISTRY.update(functional.ADAPTERS)
_REGISTRY.update(text.ADAPTERS)
_REGISTRY.update(moe.ADAPTERS)
_REGISTRY.update(seq2seq.ADAPTERS)
_REGISTRY.update(vision.ADAPTERS)
_REGISTRY.update(multimodal.ADAPTERS)


def register_adapter(key: str, adapter: Adapter | ByConfig, *, overwrite: bool = False) -> None:
    """Teach the registry a new architecture.

    Args:
        key: ``config.model_type`` of a transformers model, or the model's class name.
        adapter: where its FFNs are (a :class:`~model_adapters.spec.ByConfig` when that depends on the config).
        overwrite: replace an existing entry instead of raising.

    >>> from torch import nn
    >>> class Block(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.up, self.down = nn.Linear(4, 9), nn.Linear(9, 4)
    >>> class Tiny(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.layers = nn.ModuleList(Block() for _ in range(3))
    >>> from model_adapters import FFNSite
    >>> register_adapter("Tiny", Adapter(sites=(FFNSite("ffn", blocks="layers", pre="up", post="down"),)))
    >>> get_adapter(Tiny()).sites[0].pre, "Tiny" in supported_types()
    ('up', True)
    >>> _ = _REGISTRY.pop("Tiny")  # leave the registry as it was
    """
    if not isinstance(adapter, (Adapter, ByConfig)):
        raise TypeError(f"adapter must be a model_adapters.Adapter or ByConfig, got {type(adapter).__name__}")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"an adapter for {key!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[key] = adapter


def supported_types() -> list[str]:
    """Every key the registry knows, sorted."""
    return sorted(_REGISTRY)


def lookup_keys(model: nn.Module) -> list[str]:
    """Registry keys that could describe ``model``: its ``config.model_type``, then its class names (MRO)."""
    model = unwrap_model(model)
    keys = []
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type:
        keys.append(model_type)
    keys.extend(cls.__name__ for cls in type(model).__mro__ if issubclass(cls, nn.Module) and cls is not nn.Module)
    return keys


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model`` (wrappers are looked through): table entry, else structural detection.

    Raises:
        ValueError: a known architecture with nothing to measure (``refusals.REFUSALS``, the reason in the
            message), nothing in the table and no FFN-shaped blocks (the message shows how to register one),
            or a table entry whose config attribute has a value it does not know.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
    ...                      num_key_value_heads=2, vocab_size=50)
    >>> adapter = get_adapter(LlamaForCausalLM(config))  # config.model_type "llama"
    >>> site = adapter.sites[0]
    >>> site.blocks, site.pre, site.post, adapter.gated
    ('layers', 'mlp.gate_proj', 'mlp.down_proj', True)
    """
    for key in lookup_keys(model):
        if key in _REGISTRY:
            entry = _REGISTRY[key]
            if isinstance(entry, ByConfig):
                return entry.adapter_for(getattr(unwrap_model(model), "config", None))
            return entry
        if key in REFUSALS:
            raise ValueError(
                f"{type(unwrap_model(model)).__name__} (key {key!r}) is refused: {REFUSALS[key]}. "
                f"If it does have an FFN, register one with model_adapters.register_adapter({key!r}, ...)."
            )
    detected = moe.detect_moe_adapter(model) or detect_adapter(model)
    if detected is not None:
        return detected
    inner = unwrap_model(model)
    key = lookup_keys(inner)[0]
    raise ValueError(
        f"No FFN adapter for {type(inner).__name__} (key {key!r}) and no FFN-shaped blocks "
        f"(Linear d->h, activation, Linear h->d inside a ModuleList of blocks) were found.\n"
        f"Supported types: {', '.join(supported_types())}.\n"
        f"Register one, for example:\n"
        f"    import model_adapters\n"
        f"    model_adapters.register_adapter(\n"
        f"        {key!r},\n"
        f"        model_adapters.Adapter(sites=(model_adapters.FFNSite(\n"
        f"            name='ffn', blocks='layers', pre='mlp.up_proj', post='mlp.down_proj'),)),\n"
        f"    )\n"
        f"where `blocks` is the path of the ModuleList of blocks, `pre` the module (inside a block) whose "
        f"output is the pre-activation and `post` the module whose input is the post-activation."
    )
