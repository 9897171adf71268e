"""LLaMA variants of the NerVE paper: RoPE (default) vs NoPE, at the paper's scales (71M ... 1.3B).

NoPE (no positional encoding; Kazemnejad et al., 2023): in transformers 5 ``LlamaModel.forward`` calls
``self.rotary_emb(hidden_states, position_ids)`` once and hands ``(cos, sin)`` to every attention layer,
which applies ``q * cos + rotate_half(q) * sin`` (same for k). ``apply_nope`` swaps the rotary module
for ``NoRotaryEmbedding``, which returns ``cos = 1, sin = 0``: q and k leave the rotation unchanged, so
attention sees no position except through the causal mask. Nothing else in the model changes.

Size presets follow the LLaMA shapes of GaLore / Mix-LN (C4, T5 tokenizer, vocab 32000, untied head),
which give the paper's 71M, 130M, 250M, 350M and 1.3B (``"paper"`` = 71M).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from ._modules import replace_modules


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int  # residual width d
    intermediate_size: int  # SwiGLU FFN width D
    num_hidden_layers: int  # decoder layers
    num_attention_heads: int  # query heads (= key/value heads: no GQA at these scales)
    vocab_size: int = 32000  # T5 tokenizer of the C4 runs
    max_position_embeddings: int = 1024  # longest context (RoPE tables are computed, not learned)
    tie_word_embeddings: bool = False  # LLaMA keeps a separate LM head


LLAMA_SIZES: dict[str, LlamaShape] = {
    # tests: the odd sizes of DESIGN §5 (hidden 32, intermediate 37, 2 layers)
    "tiny": LlamaShape(32, 37, 2, 4, vocab_size=97, max_position_embeddings=64),
    # 2 CPU cores, a locally trained tokenizer
    "cpu": LlamaShape(128, 344, 4, 4, vocab_size=4096, max_position_embeddings=256),
    "71m": LlamaShape(512, 1368, 12, 8),  # 70.6M
    "130m": LlamaShape(768, 2048, 12, 12),  # 134.1M
    "250m": LlamaShape(768, 2560, 24, 16),  # 247.4M
    "350m": LlamaShape(1024, 2736, 24, 16),  # 367.9M
    "1.3b": LlamaShape(2048, 5461, 24, 32),  # 1339.1M
}
LLAMA_SIZES["paper"] = LLAMA_SIZES["71m"]


class NoRotaryEmbedding(nn.Module):
    """Stand-in for ``LlamaRotaryEmbedding`` that returns the identity rotation (cos = 1, sin = 0)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim  # last dimension of the (cos, sin) tables

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*position_ids.shape, self.head_dim)  # [batch, seq, head_dim]
        cos = torch.ones(shape, dtype=x.dtype, device=x.device)
        sin = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return cos, sin

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, identity rotation (NoPE)"


def _is_rotary(name: str, module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding")


def apply_nope(model: nn.Module) -> list[str]:
    """Remove rotary position embeddings from a LLaMA-style model in place; returns the replaced modules."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    replaced = replace_modules(model, _is_rotary, lambda module: NoRotaryEmbedding(head_dim))
    if not replaced:
        raise ValueError(f"{type(model).__name__} has no *RotaryEmbedding module to replace")
    return replaced


# positional encoding -> in-place transformation of the built model
POSITIONAL_ENCODINGS: dict[str, Callable[[nn.Module], Any]] = {
    "rope": lambda model: None,  # LLaMA's own RoPE
    "nope": apply_nope,
}


def llama_config(size: str = "tiny", vocab_size: int | None = None, **overrides: Any) -> LlamaConfig:
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown LLaMA size {size!r}; choose one of {sorted(LLAMA_SIZES)}")
    fields = {**asdict(LLAMA_SIZES[size]), **overrides}  # overrides may replace preset fields
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    fields.setdefault("bos_token_id", 0)
    fields.setdefault("eos_token_id", 1)
    fields.setdefault("pad_token_id", None)
    return LlamaConfig(**fields)


def build_llama(
    size: str = "tiny",
    vocab_size: int | None = None,
    positional: str = "rope",
    **config_overrides: Any,
) -> LlamaForCausalLM:
    """Build a randomly initialised LLaMA with ``positional="rope"`` (default) or ``"nope"``."""
    if positional not in POSITIONAL_ENCODINGS:
        raise ValueError(f"unknown positional encoding {positional!r}; choose one of {sorted(POSITIONAL_ENCODINGS)}")
    model = LlamaForCausalLM(llama_config(size, vocab_size, **config_overrides))
    POSITIONAL_ENCODINGS[positional](model)
    return model
