"""Model zoo of the NerVE paper (Jha & Reagen, ICLR 2026, arXiv 2603.06922): variants and optimizers.

Each variant is a transformation of a stock ``transformers`` or ``timm`` model, documented with the
paper section it follows; ``scripts/`` and ``benchmarks/`` build them by name::

    import nerve_zoo as zoo
    model = zoo.build_model("gpt2-normfree-relu", size="tiny", vocab_size=97)
    optimizer = zoo.build_optimizer("muon", model, lr=1e-3, weight_decay=0.1)

``nerve_zoo.image_training`` wraps a Mixer for ``transformers.Trainer`` (used by ``scripts/train_mixer.py``
and ``benchmarks/``). This package imports ``nerve_hf``; ``nerve_hf`` never imports it.

Importing this package is cheap: transformers, timm and scikit-learn load on first use.
"""

from importlib import import_module

# public name -> submodule of nerve_zoo that defines it
_LAZY = {
    # registry
    "VARIANTS": "registry",
    "Variant": "registry",
    "build_model": "registry",
    "count_parameters": "registry",
    "list_variants": "registry",
    # GPT-2 transformations
    "build_gpt2": "gpt2",
    "GPT2_SIZES": "gpt2",
    "remove_layernorms": "gpt2",
    "set_ffn_activation": "gpt2",
    "apply_ffn_weight_norm": "weight_norms",
    "apply_norm_position": "norm_position",
    "PostLNBlock": "norm_position",
    "LearnableLeakyReLU": "activations",
    # LLaMA
    "build_llama": "llama",
    "LLAMA_SIZES": "llama",
    "apply_nope": "llama",
    "NoRotaryEmbedding": "llama",
    # mixture of experts (Mixtral at the LLaMA shapes)
    "build_llama_moe": "moe",
    "llama_moe_config": "moe",
    # MLP-Mixer and images
    "build_mixer": "mixer",
    "MIXER_SIZES": "mixer",
    "set_mixer_activations": "mixer",
    "load_image_dataset": "images",
    "ImageTensorDataset": "images",
    # optimizers
    "build_optimizer": "optim",
    "CombinedOptimizer": "optim",
    "ExpertMuon": "optim",
    "split_parameters": "optim",
    "Dion": "dion",
    "dion_power_step": "dion",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'nerve_zoo' has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)


def __dir__():
    return __all__
