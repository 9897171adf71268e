"""MLP-Mixer variants of the NerVE paper (timm ``MlpMixer``): GELU vs ReLU in each of the two FFNs.

Every ``MixerBlock`` has two FFNs (timm ``Mlp`` modules with ``fc1 -> act -> fc2``):

- FFN1 = ``mlp_tokens``: token mixing, applied across patches (width ``0.5 * embed_dim`` for Mixer-B/16);
- FFN2 = ``mlp_channels``: channel mixing, applied per patch (width ``4 * embed_dim``).

``set_mixer_activations`` replaces each one's ``act`` module independently, so the four variants
GELU/GELU (timm's default), ReLU/GELU, GELU/ReLU and ReLU/ReLU are all reachable. The paper trains
Mixer-B/16 on CIFAR-100 from scratch (no pretrained weights), comparing SGD and Adam.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

from timm.models.mlp_mixer import MlpMixer
from torch import nn

# activation name -> module factory
MIXER_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


@dataclass(frozen=True)
class MixerShape:
    img_size: int  # input side in pixels (square images)
    patch_size: int  # patch side; tokens = (img_size / patch_size) ** 2
    num_blocks: int  # Mixer blocks
    embed_dim: int  # channels per token C
    in_chans: int = 3  # input channels
    mlp_ratio: tuple[float, float] = (0.5, 4.0)  # (token-mixing, channel-mixing) FFN width / C


MIXER_SIZES: dict[str, MixerShape] = {
    "tiny": MixerShape(img_size=16, patch_size=4, num_blocks=2, embed_dim=32),  # 16 tokens
    "cpu": MixerShape(img_size=16, patch_size=2, num_blocks=4, embed_dim=128),  # 64 tokens
    # Mixer-B/16 (Tolstikhin et al., 2021): 59.2M parameters with a 100-class head
    "paper": MixerShape(img_size=224, patch_size=16, num_blocks=12, embed_dim=768),
}


def set_mixer_activations(model: MlpMixer, token_act: str = "gelu", channel_act: str = "gelu") -> MlpMixer:
    """Install fresh activation modules in every block's token-mixing (FFN1) and channel-mixing (FFN2) MLP."""
    for act in (token_act, channel_act):
        if act not in MIXER_ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(MIXER_ACTIVATIONS)}")
    for block in model.blocks:
        block.mlp_tokens.act = MIXER_ACTIVATIONS[token_act]()
        block.mlp_channels.act = MIXER_ACTIVATIONS[channel_act]()
    return model


def build_mixer(
    size: str = "tiny",
    num_classes: int = 10,
    token_act: str = "gelu",
    channel_act: str = "gelu",
    **overrides: Any,
) -> MlpMixer:
    """Build a randomly initialised MLP-Mixer; ``overrides`` replace preset fields or add ``MlpMixer`` kwargs."""
    if size not in MIXER_SIZES:
        raise ValueError(f"unknown Mixer size {size!r}; choose one of {sorted(MIXER_SIZES)}")
    kwargs = {**asdict(MIXER_SIZES[size]), **overrides}
    model = MlpMixer(num_classes=num_classes, **kwargs)
    return set_mixer_activations(model, token_act, channel_act)
