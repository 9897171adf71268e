"""Dense (non-gated) decoder FFNs: up projection -> activation -> down projection."""

from .spec import ffn

# config.model_type -> Adapter
ADAPTERS = {
    "gpt2": ffn("h", pre="mlp.c_fc", post="mlp.c_proj"),  # Conv1D up/down
    "gptj": ffn("h", pre="mlp.fc_in", post="mlp.fc_out"),
    "gpt_neox": ffn("layers", pre="mlp.dense_h_to_4h", post="mlp.dense_4h_to_h"),  # Pythia
    "opt": ffn("decoder.layers", pre="fc1", post="fc2"),  # fc1/fc2 live directly in the layer
    "phi": ffn("layers", pre="mlp.fc1", post="mlp.fc2"),
}
