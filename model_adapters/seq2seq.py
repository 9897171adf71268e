"""Encoder–decoder models: the encoder's and the decoder's FFNs as two site families, each counting the
tokens of its own stack (the encoder the call's ``attention_mask``; the decoder ``decoder_attention_mask``,
else the labels' real positions). ``layer`` is the block index within each stack.

Read from the installed transformers modeling files:

* T5 / mT5 / UMT5: ``{encoder,decoder}.block.N`` holds a ``layer`` list (self-attention, [cross-attention],
  FFN); the FFN is its last entry, ``layer.1`` in the encoder and ``layer.2`` in the decoder.
  ``DenseReluDense`` is ``T5DenseActDense`` (``wi`` -> act -> ``wo``) or, when ``config.is_gated_act``,
  ``T5DenseGatedActDense`` (act(``wi_0``) * ``wi_1`` -> ``wo``; pre = ``wi_0``).
* LongT5 and Pop2Piano: T5's block layout.
* BART / mBART / Pegasus / Marian / Whisper, and BigBirdPegasus, Blenderbot, BlenderbotSmall, M2M100, Mvp,
  PLBart: ``fc1`` -> act -> ``fc2`` directly in each of ``{encoder,decoder}.layers.N``. Whisper's encoder
  takes no mask (every frame of its input counts). LED's layout is BART's, but its encoder pads its input
  to a multiple of its attention window inside the model: its token source (``"encoder_window"``) counts
  the call's mask and never the rows of that padding.
* T5Gemma: ``{encoder,decoder}.layers.N.mlp`` are Gemma's gated MLPs (``gate_proj``, ``up_proj``,
  ``down_proj``). T5Gemma2's encoder is a text encoder (``encoder.text_model.layers``, image tokens spliced
  into its sequence, so the call's mask covers them) beside a SigLIP vision tower
  (``encoder.vision_tower.encoder.layers``, every patch row counts); its decoder is T5Gemma's.
* The ``*ForCausalLM`` head of a BART-like family is its decoder alone, a causal LM (its config says
  ``is_encoder_decoder=False``): one ``ffn`` family counting the call's ``attention_mask``, like OPT.

The decoder is ``optional``: encoder-only classes (``T5EncoderModel``, ``WhisperForAudioClassification``)
measure their encoder.
"""

from .spec import Adapter, ByConfig, ExpertsSpec, FFNSite, ffn


def _t5(gated: bool) -> Adapter:
    pre = "DenseReluDense.wi_0" if gated else "DenseReluDense.wi"
    return Adapter(
        sites=(
            FFNSite("encoder.ffn", "encoder.block", f"layer.1.{pre}", "layer.1.DenseReluDense.wo",
                    stack="encoder", tokens="encoder"),
            FFNSite("decoder.ffn", "decoder.block", f"layer.2.{pre}", "layer.2.DenseReluDense.wo",
                    stack="decoder", tokens="decoder", optional=True),
        ),
        gated=gated,
    )  # fmt: skip


def _fc(encoder_tokens: str = "encoder") -> ByConfig:
    """A BART-like family: encoder and decoder stacks, or, for its ``*ForCausalLM`` head, the decoder alone."""
    both = Adapter(
        sites=(
            FFNSite("encoder.ffn", "encoder.layers", "fc1", "fc2", stack="encoder", tokens=encoder_tokens),
            FFNSite("decoder.ffn", "decoder.layers", "fc1", "fc2", stack="decoder", tokens="decoder", optional=True),
        )
    )
    return ByConfig("is_encoder_decoder", ((True, both), (False, ffn("decoder.layers", pre="fc1", post="fc2"))))


def _gated_layers(encoder: str, decoder: str) -> Adapter:
    """Gemma-style gated MLPs (``mlp.gate_proj`` -> act, times ``mlp.up_proj`` -> ``mlp.down_proj``) per stack."""
    return Adapter(
        sites=(
            FFNSite("encoder.ffn", encoder, "mlp.gate_proj", "mlp.down_proj", stack="encoder", tokens="encoder"),
            FFNSite("decoder.ffn", decoder, "mlp.gate_proj", "mlp.down_proj", stack="decoder", tokens="decoder",
                    optional=True),
        ),
        gated=True,
    )  # fmt: skip


_T5_GEMMA2 = Adapter(
    sites=(
        *_gated_layers("encoder.text_model.layers", "decoder.layers").sites,
        FFNSite("vision.ffn", "encoder.vision_tower.encoder.layers", "mlp.fc1", "mlp.fc2",
                stack="vision", tokens="all", optional=True),
    ),
    gated=True,
)  # fmt: skip


# Switch Transformers' experts: a ModuleDict of T5 FFNs (expert_{e}.wi -> act -> wo), called with a one-hot
# top-1 choice [N, 1, E] from which the router already dropped the tokens over an expert's capacity. An expert's
# post is act(wi x), before the expert's dropout (the dense FFNs' post is wo's input, after it): equal in eval.
_SWITCH_EXPERTS = ExpertsSpec(
    routing="one_hot", gated=False, transposed=False, bias=False, gate_up="expert_{}.wi", act="expert_{}.act"
)


def _switch_stack(stack: str, ff: str, tokens: str) -> tuple[FFNSite, FFNSite]:
    """One stack of Switch Transformers: T5 blocks whose FFN (``layer.{ff}.mlp``) is dense or sparse."""
    blocks, mlp = f"{stack}.block", f"layer.{ff}.mlp"
    return (
        FFNSite(f"{stack}.ffn", blocks, f"{mlp}.wi", f"{mlp}.wo", stack=stack, tokens=tokens, optional=True),
        FFNSite(f"{stack}.experts", blocks, f"{mlp}.experts", f"{mlp}.experts", kind="expert",
                experts=_SWITCH_EXPERTS, stack=stack, tokens=tokens, optional=True),
    )  # fmt: skip


_SWITCH = Adapter(sites=(*_switch_stack("encoder", "1", "encoder"), *_switch_stack("decoder", "2", "decoder")))

_T5 = ByConfig("is_gated_act", ((False, _t5(gated=False)), (True, _t5(gated=True))))
_BART = _fc()

# config.model_type -> Adapter (or ByConfig)
ADAPTERS = {
    "t5": _T5,
    "mt5": _T5,
    "umt5": _T5,
    "bart": _BART,
    "mbart": _BART,
    "pegasus": _BART,
    "marian": _BART,
    "whisper": _fc(encoder_tokens="all"),
    "longt5": _T5,
    "pop2piano": _T5,
    "bigbird_pegasus": _BART,
    "blenderbot": _BART,
    "blenderbot-small": _BART,
    "m2m_100": _BART,
    "mvp": _BART,
    "plbart": _BART,
    "led": _fc(encoder_tokens="encoder_window"),
    "t5gemma": _gated_layers("encoder.layers", "decoder.layers"),
    "t5gemma2": _T5_GEMMA2,
    "switch_transformers": _SWITCH,
}
