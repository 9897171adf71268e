"""Every language-model head class the installed transformers exports, built tiny from its config class.

A config is shrunk generically, key by key, over its defaults and its sub-configs (text, vision, audio,
encoder, decoder): widths to 32, FFN widths to 48, blocks to 2, heads to 2 of width 16, experts to 4
(top-2), the vocabulary to just above the largest special token id. Lists with one entry per block are
cut to the new number of blocks. What cannot be built that way is reported with the exception's text.
"""

from __future__ import annotations

import re

import torch
import transformers

HEADS = re.compile(r"For(CausalLM|ConditionalGeneration|MaskedLM)$")
WIDTH, FFN_WIDTH, BLOCKS, N_HEADS, HEAD_DIM, EXPERTS, TOP_K = 32, 48, 2, 2, 16, 4, 2

_RULES = (  # (key pattern, new value); the first matching rule wins; only ints are changed
    (re.compile(r"intermediate_size|ffn_dim|^d_ff$|^n_inner$|ffn_hidden_size|^mlp_dim$|^dim_ff$|^d_inner$"), FFN_WIDTH),
    (re.compile(r"hidden_size$|^d_model$|^n_embd$|^n_embed$|^embed_dim$|^hidden_dim$|^dim$|^model_dim$"), WIDTH),
    (re.compile(r"^(num_)?(hidden_)?layers$|^num_hidden_layers$|^n_layers?$|_layers$|^depth$"), BLOCKS),
    (re.compile(r"key_value_heads|kv_heads"), N_HEADS),
    (re.compile(r"attention_heads$|^n_heads?$|^num_heads$"), N_HEADS),
    (re.compile(r"head_dim$|^kv_channels$|lora_rank$"), HEAD_DIM),
    (re.compile(r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts|num_routed_experts)$"), EXPERTS),
    (re.compile(r"^(num_experts_per_tok|moe_topk|moe_k|num_selected_experts|top_k|n_activated_experts)$"), TOP_K),
    (re.compile(r"^(n_group|topk_group|num_expert_groups?)$"), 1),
)
_TOKEN_ID = re.compile(r"token_id$|token_index$|_token$|^(pad|bos|eos|decoder_start)_token_id$")


def head_classes() -> list[str]:
    """Names of every ``*ForCausalLM``/``*ForConditionalGeneration``/``*ForMaskedLM`` model class."""
    return sorted(n for n in dir(transformers) if HEADS.search(n) and not n.startswith(("Auto", "TF", "Flax")))


def _max_token_id(value) -> int:
    if isinstance(value, dict):
        return max([-1] + [_max_token_id(v) for v in value.values()])
    return -1


def _shrink(config: dict) -> dict:
    """``config`` (a ``to_dict`` of a config) with every size rule applied, sub-configs included."""
    out = dict(config)
    old_blocks = {v for k, v in config.items() if isinstance(v, int) and re.search(r"layers$", k) and v > BLOCKS}
    for key, value in config.items():
        if isinstance(value, dict) and key not in ("id2label", "label2id", "rope_parameters", "rope_scaling"):
            out[key] = _shrink(value)
        elif isinstance(value, bool):
            continue
        elif isinstance(value, int):
            for pattern, new in _RULES:
                if pattern.search(key):
                    out[key] = min(value, new) if value > 0 else value
                    break
        elif isinstance(value, list) and len(value) in old_blocks and key != "architectures":
            out[key] = value[:BLOCKS]
    ids = [v for k, v in config.items() if isinstance(v, int) and not isinstance(v, bool) and _TOKEN_ID.search(k)]
    if "vocab_size" in config and isinstance(config["vocab_size"], int):
        out["vocab_size"] = max([128] + [i + 1 for i in ids])
    for drop in ("transformers_version", "architectures", "_name_or_path", "id2label", "label2id"):
        out.pop(drop, None)
    return out


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random eval-mode instance of the head class ``name`` from its config class's shrunk defaults."""
    cls = getattr(transformers, name)
    config_cls = cls.config_class
    config = config_cls(**_shrink(config_cls().to_dict()))
    torch.manual_seed(seed)
    return cls(config).eval()
