"""Gated FFNs whose gate and up projections are one fused linear: pre is the gate's chunk of its output.

Which half is the gate, from each modeling file:
- Glm/Glm4 ``gate_up_proj``: ``gate, up = out.chunk(2, -1)`` -> gate first.
- ModernBertDecoder ``Wi``: ``input, gate = out.chunk(2, -1)``; ``Wo(act(input) * gate)`` -> the
  activated half (``input``) is first.
- Moshi ``fc1``: ``out.view(b, s, 2, -1)``; ``act(out[..., 0, :]) * out[..., 1, :]`` -> first half.
- GraniteMoeHybrid ``shared_mlp.input_linear``: ``act(chunks[0]) * chunks[1]`` -> first half. Beside
  routed experts it is the always-on shared expert.
"""

from .spec import Adapter, FFNSite, ffn

_FIRST_HALF = (0, 2)

# config.model_type -> Adapter
ADAPTERS = {
    "glm": ffn("layers", pre="mlp.gate_up_proj", post="mlp.down_proj", gated=True, pre_chunk=_FIRST_HALF),
    "glm4": ffn("layers", pre="mlp.gate_up_proj", post="mlp.down_proj", gated=True, pre_chunk=_FIRST_HALF),
    "modernbert-decoder": ffn("layers", pre="mlp.Wi", post="mlp.Wo", gated=True, pre_chunk=_FIRST_HALF),
    # MoshiForCausalLM: model.layers; MoshiForConditionalGeneration: decoder.model.layers (its depth
    # decoder's per-codebook FlexibleLinear FFNs are not linears and are not measured).
    "moshi": ffn("model.layers", pre="mlp.fc1", post="mlp.fc2", gated=True, pre_chunk=_FIRST_HALF),
    "granitemoehybrid": Adapter(
        sites=(
            FFNSite(
                "shared_expert",
                "layers",
                pre="shared_mlp.input_linear",
                post="shared_mlp.output_linear",
                pre_chunk=_FIRST_HALF,
                kind="shared_expert",
            ),
        ),
        gated=True,
    ),
}
