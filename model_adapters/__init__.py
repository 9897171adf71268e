"""Where the FFNs of a model are, as data: one small table per architecture family plus a registry.

>>> import model_adapters
>>> model_adapters.get_adapter  # doctest: +ELLIPSIS
<function get_adapter at ...>
"""

from .detect import detect_adapter, find_ffn, linear_dims, other_towers
from .registry import get_adapter, lookup_keys, register_adapter, supported_types
from .resolve import LayerRangeError, ResolvedSite, resolve_sites
from .spec import Adapter, ByConfig, ExpertsSpec, FFNSite
from .unwrap import unwrap_model

__all__ = [
    "Adapter",
    "ByConfig",
    "ExpertsSpec",
    "FFNSite",
    "LayerRangeError",
    "ResolvedSite",
    "detect_adapter",
    "other_towers",
    "find_ffn",
    "get_adapter",
    "linear_dims",
    "lookup_keys",
    "register_adapter",
    "resolve_sites",
    "supported_types",
    "unwrap_model",
]
