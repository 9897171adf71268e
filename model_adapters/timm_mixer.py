"""timm MLP-Mixer: a token-mixing and a channel-mixing MLP per block, reported as two site families."""

from .spec import Adapter, FFNSite

# model class name -> Adapter
ADAPTERS = {
    "MlpMixer": Adapter(
        sites=(
            FFNSite("token_mlp", "blocks", pre="mlp_tokens.fc1", post="mlp_tokens.fc2"),
            FFNSite("channel_mlp", "blocks", pre="mlp_channels.fc1", post="mlp_channels.fc2"),
        ),
    ),
}
