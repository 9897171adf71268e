"""LayerNorm placement in GPT-2 blocks (NerVE §3.4): PreLN vs PostLN vs MixLN.

- PreLN (GPT-2's own block): ``x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))``.
- PostLN (Vaswani et al., 2017): ``x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))``.
- MixLN (Li et al., 2024, "Mix-LN"): PostLN in the first ``ceil(post_fraction * n_layer)`` blocks,
  PreLN after (default 25%: 3 of GPT-2 small's 12 blocks, as in the paper's code).

The final ``ln_f`` stays in every placement, as in the paper's code.

``PostLNBlock`` subclasses ``GPT2Block`` and adopts an existing block's submodules (same names, same
parameters, so state-dict keys and FFN paths such as ``transformer.h.0.mlp.c_fc`` do not change). Being
a ``GPT2Block`` keeps ``output_hidden_states`` (recorded per ``GPT2Block`` instance), gradient
checkpointing (``GradientCheckpointingLayer``) and KV-cache generation working.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

# placement -> number of leading PostLN blocks, given (n_layer, post_fraction)
_POST_LN_BLOCKS = {
    "pre": lambda n_layer, fraction: 0,
    "post": lambda n_layer, fraction: n_layer,
    "mix": lambda n_layer, fraction: math.ceil(fraction * n_layer),
}
NORM_POSITIONS = tuple(_POST_LN_BLOCKS)


class PostLNBlock(GPT2Block):
    """A GPT-2 block computed in PostLN order, reusing ``block``'s ln_1, attn, ln_2, mlp (and cross-attention)."""

    def __init__(self, block: GPT2Block):
        nn.Module.__init__(self)  # not GPT2Block.__init__: that would allocate fresh submodules
        for name, child in block.named_children():
            self.add_module(name, child)
        self.gradient_checkpointing = block.gradient_checkpointing
        if hasattr(block, "_gradient_checkpointing_func"):
            self._gradient_checkpointing_func = block._gradient_checkpointing_func

    def forward(
        self,
        hidden_states: torch.Tensor,  # [batch, seq, d]
        past_key_values=None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = False,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(
            hidden_states,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = self.ln_1(hidden_states + attn_output)  # [batch, seq, d]

        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError("encoder_hidden_states given to a block built without add_cross_attention=True")
            cross_output, _ = self.crossattention(
                hidden_states,
                past_key_values=past_key_values,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
            )
            hidden_states = self.ln_cross_attn(hidden_states + cross_output)

        return self.ln_2(hidden_states + self.mlp(hidden_states))  # [batch, seq, d]


def apply_norm_position(model: nn.Module, position: str = "pre", post_fraction: float = 0.25) -> list[int]:
    """Set the LayerNorm placement of a GPT-2 model in place; returns the indices of PostLN blocks.

    ``position``: ``"pre"`` (no change), ``"post"`` (every block) or ``"mix"`` (the first
    ``ceil(post_fraction * n_layer)`` blocks). Apply before registering hooks on the blocks themselves
    (hooks on their submodules, e.g. ``mlp.c_fc``, are kept).
    """
    if position not in _POST_LN_BLOCKS:
        raise ValueError(f"unknown norm position {position!r}; choose one of {list(NORM_POSITIONS)}")
    if not 0.0 <= post_fraction <= 1.0:
        raise ValueError(f"post_fraction must lie in [0, 1], got {post_fraction}")
    blocks = getattr(model, "transformer", model).h
    n_post = _POST_LN_BLOCKS[position](len(blocks), post_fraction)
    for index in range(n_post):
        if not isinstance(blocks[index], PostLNBlock):
            blocks[index] = PostLNBlock(blocks[index])
    return list(range(n_post))
