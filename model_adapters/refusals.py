"""Architectures the table knows and refuses, with the reason: measuring them would mean guessing.

``config.model_type`` -> why there is nothing to measure (or nothing measurable as an FFN). ``get_adapter``
raises a ``ValueError`` with the reason; ``register_adapter`` under the same key still takes precedence.
"""

_NO_FFN = (
    "its blocks are state-space mixers (in_proj -> conv/scan -> out_proj) with no feed-forward network: "
    "NerVE measures FFNs, so there is nothing to measure"
)

# config.model_type -> reason
REFUSALS = {
    "mamba": _NO_FFN,
    "mamba2": _NO_FFN,
    "falcon_mamba": _NO_FFN,
}
REFUSALS.update(
    {
        "albert": "ALBERT shares one layer's weights across all its layers: hooks on that FFN see every layer's "
        "tokens at once and cannot tell the layers apart",
        "prophetnet": "its decoder FFNs run the main stream and the n-gram prediction streams in one call; "
        "measuring the main stream's real tokens needs a token source for those streams, which there is not yet",
    }
)

REFUSALS.update(
    {
        "nemo_speechlm": "its language model is NemotronH (in the table), but its audio stacks "
        "(audio_tower.asr_encoder, the diarization model's audio tower, word_timestamp_encoder: fc1 -> act -> fc2) "
        "count the frames of input_features_mask, subsampled inside the model (modeling_nemotron3_5_transcribe.py:415, "
        "580-596), for which there is no token source yet: their rows would count padded frames",
        "nllb-moe": "its experts module does not run the experts its router chooses: NllbMoeSparseMLP passes the "
        "router's one-hot top-1 mask [N, E] (modeling_nllb_moe.py:384) and NllbMoeExperts one-hots it again "
        "(one_hot(router_mask, num_classes=num_experts), modeling_nllb_moe.py:353), so expert_0 runs on every "
        "zero of the mask and expert_1 on every one, whatever the router chose: per-expert rows would describe "
        "no routed expert",
        "kosmos-2.5": "its FFN normalises between the activation and fc2 (ffn_layernorm), so fc2's input is not "
        "the post-activation",
        "pegasus_x": "each encoder FFN runs twice in one forward (its global and its local tokens), which the "
        "token sources cannot yet tell apart",
    }
)
