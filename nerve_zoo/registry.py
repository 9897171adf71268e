"""Registry of the NerVE paper's model variants: ``VARIANTS[name]`` and ``build_model(name, size)``.

A ``Variant`` is data: the family (which builder), the builder's keyword arguments, the paper section it
follows and a one-line description. Builders are resolved lazily, so listing variants imports neither
transformers nor timm. Sizes are per family: ``tiny`` (tests), ``cpu`` (2-core runs), ``paper`` (the
paper's parameter count) and extra named scales (GPT-2 ``160m``/``350m``, LLaMA ``71m`` ... ``1.3b``).
Paper sizes build on the meta device without allocating memory::

    with torch.device("meta"):
        model = build_model("gpt2-gelu", size="paper")
    count_parameters(model)  # 124_439_808
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import MappingProxyType
from typing import Any, Mapping

from torch import nn

# family -> "module:function" of its builder (imported on first build)
FAMILIES: Mapping[str, str] = MappingProxyType(
    {
        "gpt2": "nerve_zoo.gpt2:build_gpt2",
        "llama": "nerve_zoo.llama:build_llama",
        "llama_moe": "nerve_zoo.moe:build_llama_moe",
        "mixer": "nerve_zoo.mixer:build_mixer",
    }
)


@dataclass(frozen=True)
class Variant:
    name: str  # registry key, e.g. "gpt2-normfree-relu"
    family: str  # key of FAMILIES
    kwargs: Mapping[str, Any]  # builder keyword arguments (read-only view)
    section: str  # NerVE paper section the variant follows
    description: str  # one line for tables and --help


def _variant(name: str, family: str, section: str, description: str, **kwargs: Any) -> Variant:
    return Variant(name, family, MappingProxyType(kwargs), section, description)


_S31 = "§3.1 activation functions (GELU vs ReLU)"
_S32 = "§3.2 normalisation-free GPT-2"
_S33 = "§3.3 FFN weight geometry (NormFree GELU + weight normalisation)"
_S34_NORM = "§3.4 LayerNorm placement"
_S34_WIDTH = "§3.4 FFN width sweep"
_S_POS = "positional encoding: RoPE vs NoPE (LLaMA on C4)"
_S_MIXER = "beyond transformers: MLP-Mixer on CIFAR-100"
_S_MOE = "beyond the paper: mixture of experts vs a dense FFN of the same active parameters"

_ALL = [
    _variant("gpt2-gelu", "gpt2", _S31, "GPT-2, PreLN, GELU FFN (baseline)", activation="gelu"),
    _variant("gpt2-relu", "gpt2", _S31, "GPT-2, PreLN, ReLU FFN", activation="relu"),
    _variant(
        "gpt2-normfree-gelu", "gpt2", _S32, "GPT-2 without any LayerNorm, GELU", activation="gelu", layernorm=False
    ),
    _variant(
        "gpt2-normfree-relu", "gpt2", _S32, "GPT-2 without any LayerNorm, ReLU", activation="relu", layernorm=False
    ),
    _variant(
        "gpt2-normfree-lrelu",
        "gpt2",
        _S32,
        "GPT-2 without any LayerNorm, learnable LeakyReLU (slope per layer, init 0.01)",
        activation="learnable_lrelu",
        layernorm=False,
    ),
    _variant(
        "gpt2-wnorm",
        "gpt2",
        _S33,
        "NormFree GELU, weight normalisation on c_fc/c_proj",
        activation="gelu",
        layernorm=False,
        ffn_weight_norm="weight",
    ),
    _variant(
        "gpt2-snorm",
        "gpt2",
        _S33,
        "NormFree GELU, spectral normalisation on c_fc/c_proj",
        activation="gelu",
        layernorm=False,
        ffn_weight_norm="spectral",
    ),
    _variant(
        "gpt2-hnorm",
        "gpt2",
        _S33,
        "NormFree GELU, unit-norm output-unit weight vectors on c_fc/c_proj",
        activation="gelu",
        layernorm=False,
        ffn_weight_norm="hyperspherical",
    ),
    _variant("gpt2-preln", "gpt2", _S34_NORM, "GPT-2 PreLN (its own block order)", norm_position="pre"),
    _variant("gpt2-postln", "gpt2", _S34_NORM, "GPT-2 PostLN in every block", norm_position="post"),
    _variant(
        "gpt2-mixln",
        "gpt2",
        _S34_NORM,
        "GPT-2 MixLN: PostLN in the first 25% of blocks, PreLN after",
        norm_position="mix",
        post_fraction=0.25,
    ),
    *[
        _variant(f"gpt2-width-{mult}x", "gpt2", _S34_WIDTH, f"GPT-2 PreLN GELU, FFN width D = {mult}d", width_mult=mult)
        for mult in (1, 2, 4, 8)
    ],
    _variant("llama-rope", "llama", _S_POS, "LLaMA with rotary position embeddings (default)", positional="rope"),
    _variant("llama-nope", "llama", _S_POS, "LLaMA without positional encoding (cos=1, sin=0)", positional="nope"),
    _variant(
        "llama-moe",
        "llama_moe",
        _S_MOE,
        "LLaMA with 8 SwiGLU experts per block, top-2 (Mixtral), expert width D / 2: the dense LLaMA's active FFN",
        num_experts=8,
        top_k=2,
    ),
    *[
        _variant(
            f"mixer-{token}-{channel}",
            "mixer",
            _S_MIXER,
            f"MLP-Mixer, token-mixing FFN1 {token.upper()}, channel-mixing FFN2 {channel.upper()}",
            token_act=token,
            channel_act=channel,
        )
        for token in ("gelu", "relu")
        for channel in ("gelu", "relu")
    ],
]

VARIANTS: Mapping[str, Variant] = MappingProxyType({variant.name: variant for variant in _ALL})


def list_variants(family: str | None = None) -> list[str]:
    """Names of all variants, or of one family's."""
    return [name for name, variant in VARIANTS.items() if family is None or variant.family == family]


def _builder(family: str):
    module_name, _, function_name = FAMILIES[family].partition(":")
    return getattr(import_module(module_name), function_name)


def build_model(
    variant: str,
    size: str = "tiny",
    vocab_size: int | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build variant ``variant`` at ``size`` with random weights.

    ``vocab_size`` applies to language models (gpt2, llama), ``num_classes`` to the Mixer; ``overrides``
    replace the variant's builder kwargs or reach the model config (e.g. ``n_positions=128``).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
    spec = VARIANTS[variant]
    kwargs = {**spec.kwargs, **overrides}
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _builder(spec.family)(size=size, **kwargs)
    config = getattr(model, "config", None)
    if config is not None and not isinstance(config, dict):
        config.nerve_zoo_variant = variant  # provenance in config.json; the transformation itself is not saved
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, shared (tied) tensors counted once; works on the meta device."""
    return sum(param.numel() for param in model.parameters())
