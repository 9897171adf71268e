"""Vision–language models: a vision tower whose patch rows all count (token source ``"all"``) and a
language model counting the call's ``attention_mask``, which covers the text and the image tokens
spliced into it. The text mask is never applied to the vision tower, whatever its shape.

Paths read from the installed modeling files:

* LLaVA: ``vision_tower`` (a CLIP/SigLIP vision model: ``encoder.layers.N.mlp.fc1/fc2``)
  and ``language_model.layers.N.mlp`` (gated ``gate_proj``/``down_proj``). A LLaVA with another
  vision tower does not fit this entry and is refused (pass an adapter).
* LLaVA-Next (and -Video) and LLaVA-OneVision: LLaVA's layout; the tower runs on each image's real crops
  (any-resolution tiles and the base image; the crops that pad a batch are dropped before the tower), and
  every patch row of those counts.
* Mistral3: a Pixtral ``vision_tower`` (``transformer.layers.N.feed_forward``: gated ``gate_proj``/``up_proj``
  -> ``down_proj``) on the patches of every image at its own size, all in one row ``[1, patches, D]`` (the
  padding of a smaller image is cut before the tower): every row counts.
* Gemma3 and PaliGemma: a SigLIP ``vision_tower`` (``encoder.layers.N.mlp.fc1/fc2`` over every patch of
  every image; its pooling head's MLP is not a block) beside a Gemma ``language_model`` (gated), whose
  sequence holds the image tokens the projector fills.
* Qwen2-VL: ``visual.blocks.N.mlp`` (``fc1`` -> act -> ``fc2`` on flat patch rows ``[patches, D]``);
  Qwen2.5-VL's are gated (``gate_proj``/``up_proj``/``down_proj``); ``language_model.layers.N.mlp``.
"""

from .spec import Adapter, FFNSite

_TEXT = FFNSite("text.ffn", "language_model.layers", "mlp.gate_proj", "mlp.down_proj", stack="text")


def _vlm(vision: FFNSite) -> Adapter:
    return Adapter(sites=(vision, _TEXT), gated=True)


_TOWER = FFNSite("vision.ffn", "vision_tower.encoder.layers", "mlp.fc1", "mlp.fc2", stack="vision", tokens="all")

# config.model_type -> Adapter
ADAPTERS = {
    "llava": _vlm(_TOWER),
    "llava_next": _vlm(_TOWER),
    "llava_next_video": _vlm(_TOWER),
    "llava_onevision": _vlm(_TOWER),
    "mistral3": _vlm(FFNSite("vision.ffn", "vision_tower.transformer.layers", "feed_forward.gate_proj",
                             "feed_forward.down_proj", stack="vision", tokens="all")),
    "gemma3": _vlm(_TOWER),
    "paligemma": _vlm(_TOWER),
    "qwen2_vl": _vlm(FFNSite("vision.ffn", "visual.blocks", "mlp.fc1", "mlp.fc2", stack="vision", tokens="all")),
    "qwen2_5_vl": _vlm(FFNSite("vision.ffn", "visual.blocks", "mlp.gate_proj", "mlp.down_proj",
                               stack="vision", tokens="all")),
}  # fmt: skip
