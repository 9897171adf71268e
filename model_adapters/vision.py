"""Vision towers on their own (ViT, CLIP, SigLIP): every patch row counts (token source ``"all"``), as a
vision transformer attends to all of them; rows say ``stack="vision"``.

CLIP and SigLIP dual encoders also have a text tower, which counts the call's ``attention_mask``; the
mask is never applied to the vision tower. Paths read from the installed modeling files: ViT
``vit.layers.N.mlp.fc1/fc2``; CLIP/SigLIP ``{text,vision}_model.encoder.layers.N.mlp.fc1/fc2``, their
vision models alone ``encoder.layers.N.mlp.fc1/fc2``.
"""

from .spec import Adapter, FFNSite

_VISION = FFNSite("vision.ffn", "vision_model.encoder.layers", "mlp.fc1", "mlp.fc2", stack="vision", tokens="all")
# optional: CLIPForImageClassification / SiglipForImageClassification have no text tower
_TEXT = FFNSite("text.ffn", "text_model.encoder.layers", "mlp.fc1", "mlp.fc2", stack="text", optional=True)
_TOWER = Adapter(sites=(FFNSite("ffn", "encoder.layers", "mlp.fc1", "mlp.fc2", stack="vision", tokens="all"),))

# config.model_type -> Adapter
ADAPTERS = {
    "vit": Adapter(sites=(FFNSite("ffn", "layers", "mlp.fc1", "mlp.fc2", stack="vision", tokens="all"),)),
    "clip_vision_model": _TOWER,
    "siglip_vision_model": _TOWER,
    "clip": Adapter(sites=(_TEXT, _VISION)),
    "siglip": Adapter(sites=(_TEXT, _VISION)),
}
