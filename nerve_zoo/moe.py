"""A mixture-of-experts LLaMA for the zoo's experiment beyond the paper: transformers' own Mixtral.

``build_llama_moe`` builds a ``MixtralForCausalLM`` at one of the LLaMA shapes of ``nerve_zoo.llama``
(``LLAMA_SIZES``): the same attention (RoPE, no sliding window), RMSNorm, untied head and block count,
with every block's SwiGLU FFN replaced by ``num_experts`` SwiGLU experts of which ``top_k`` run per token
(softmax router, top-k weights renormalised to sum to 1). The shape's ``intermediate_size`` D is the
width of the dense model it is compared with; each expert has width ``F = D // top_k`` (unless
``expert_width`` names one), so a token's active FFN parameters ``top_k x 3 x d x F`` equal the dense
SwiGLU's ``3 x d x D`` (plus the router's ``E x d``).

Transformers stores the experts fused (``mlp.experts.gate_up_proj [E, 2F, d]``, ``down_proj [E, d, F]``);
``nerve_hf`` measures every expert from that module's call (rows of ``kind="expert"``). No load-balancing
loss is added (``output_router_logits=False``): the loss is the language-model loss alone, comparable
with the dense model's, and the router is free to leave experts idle.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from transformers import MixtralConfig, MixtralForCausalLM

from .llama import LLAMA_SIZES, llama_config


def llama_moe_config(
    size: str = "tiny",
    vocab_size: int | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    expert_width: int | None = None,
    experts_implementation: str = "eager",
    **overrides: Any,
) -> MixtralConfig:
    """The MixtralConfig of the LLaMA shape ``size`` (``overrides`` replace its fields; ``intermediate_size``
    there is the dense-equivalent width D) with ``num_experts`` experts of width ``expert_width`` (default
    ``D // top_k``), run by transformers' ``experts_implementation`` (``"eager"``: a loop over the experts;
    the default ``grouped_mm`` needs rows of a multiple of 16 bytes, which ``F = 86`` in float32 is not)."""
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown LLaMA size {size!r}; choose one of {sorted(LLAMA_SIZES)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    fields = {**asdict(LLAMA_SIZES[size]), **overrides}
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    dense_width = fields.pop("intermediate_size")
    width = dense_width // top_k if expert_width is None else expert_width
    if width < 1:
        raise ValueError(f"expert width must be >= 1 (D = {dense_width}, top_k = {top_k})")
    dense = llama_config(size, **fields, intermediate_size=dense_width)  # the dense model's own config
    return MixtralConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        max_position_embeddings=dense.max_position_embeddings,
        rope_parameters=dict(dense.rope_parameters),  # LLaMA's rope_theta (Mixtral's default differs)
        rms_norm_eps=dense.rms_norm_eps,  # LLaMA's (Mixtral's default differs)
        initializer_range=dense.initializer_range,
        tie_word_embeddings=dense.tie_word_embeddings,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=dense.pad_token_id,
        intermediate_size=width,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        sliding_window=None,
        output_router_logits=False,
        router_jitter_noise=0.0,
        experts_implementation=experts_implementation,
    )


def build_llama_moe(
    size: str = "tiny",
    vocab_size: int | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    expert_width: int | None = None,
    experts_implementation: str = "eager",
    **config_overrides: Any,
) -> MixtralForCausalLM:
    """A randomly initialised MoE LLaMA (``MixtralForCausalLM``, see the module docstring)."""
    config = llama_moe_config(
        size, vocab_size, num_experts, top_k, expert_width, experts_implementation, **config_overrides
    )
    return MixtralForCausalLM(config)
