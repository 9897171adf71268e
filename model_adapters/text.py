"""Text stacks that structural detection misreads, each checked in its modeling file.

- CpmAnt: the FFN is nested, ``ffn.ffn.w_in.w_0`` (gate, GELU) and ``w_in.w_1`` (up) -> ``ffn.ffn.w_out``;
  detection would see attention's ``project_q`` -> softmax -> ``attention_out`` instead.
- Gemma3 text (Gemma3 with its vision tower is in ``multimodal.py``), Gemma3n/Gemma4 text: ``mlp.gate_proj``
  -> ``mlp.down_proj``; Gemma3n/Gemma4's
  ``per_layer_input_gate`` -> ``per_layer_projection`` gates a per-layer embedding, not an FFN.
- Git: its text decoder is BERT-like (``git.encoder.layer``: ``intermediate.dense`` -> ``output.dense``);
  its image encoder (``encoder.layers``) runs only on pixels.
- Phi4Multimodal: the text decoder's fused ``mlp.gate_up_proj`` (gate first) -> ``mlp.down_proj``; its
  vision and audio encoders run only on their own inputs.
"""

from .spec import ffn

_GEMMA = ffn("layers", pre="mlp.gate_proj", post="mlp.down_proj", gated=True)

# config.model_type -> Adapter
ADAPTERS = {
    "cpmant": ffn("encoder.layers", pre="ffn.ffn.w_in.w_0", post="ffn.ffn.w_out", gated=True),
    "gemma3_text": _GEMMA,
    "gemma3n": _GEMMA,
    "gemma3n_text": _GEMMA,
    "gemma4": _GEMMA,
    "gemma4_text": _GEMMA,
    "git": ffn("encoder.layer", pre="intermediate.dense", post="output.dense"),
    "phi4_multimodal": ffn("layers", pre="mlp.gate_up_proj", post="mlp.down_proj", gated=True, pre_chunk=(0, 2)),
}
