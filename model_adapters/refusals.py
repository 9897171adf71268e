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
