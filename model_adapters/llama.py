"""Gated FFNs (SwiGLU/GeGLU): pre = gate projection output, post = act(gate) * up = down input."""

from .spec import ffn

_GATED = ffn("layers", pre="mlp.gate_proj", post="mlp.down_proj", gated=True)

# config.model_type -> Adapter
ADAPTERS = {
    "llama": _GATED,
    "mistral": _GATED,
    "qwen2": _GATED,
    "qwen3": _GATED,
    "gemma": _GATED,
    "gemma2": _GATED,
    # Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1); the gate is the first half.
    # BitNetMLP: down_proj(ffn_sub_norm(act(gate_proj(x)) * up_proj(x))): post is the norm's input.
    "bitnet": ffn("layers", pre="mlp.gate_proj", post="mlp.ffn_sub_norm", gated=True),
    "phi3": ffn("layers", pre="mlp.gate_up_proj", post="mlp.down_proj", gated=True, pre_chunk=(0, 2)),
}
