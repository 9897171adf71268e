"""What an adapter says about a model: where its FFN blocks are and which tensor is pre, which is post.

An adapter is pure data. ``FFNSite`` names one family of FFN sites repeated over the model's blocks
(a transformer has one, ``ffn``; an MLP-Mixer has two, ``token_mlp`` and ``channel_mlp``).
"""

from __future__ import annotations

from dataclasses import dataclass

# What a site measures: a plain FFN, an always-on shared expert, or routed experts.
KINDS = ("dense", "shared_expert", "expert")

# How a routed-experts module is called (see ExpertsSpec.routing).
ROUTINGS = ("call", "scaled", "grouped", "one_hot")


@dataclass(frozen=True)
class ExpertsSpec:
    """How one family's fused routed experts compute, for a site of kind ``"expert"``.

    Fields left ``None`` are read from the experts module, where transformers'
    ``use_experts_implementation`` puts them (``has_gate``, ``has_bias``, ``is_transposed``,
    ``is_concatenated``); the gate is the module's own ``_apply_gate`` when it has one.

    Attributes:
        routing: ``"call"``: ``forward(hidden_states [N, D], top_k_index [N, k], top_k_weights [N, k])``,
            outputs weighted after the down projection; ``"scaled"`` (Llama 4): ``forward(x [E*N, D])``
            with every token repeated per expert and scaled by its router score, the choice read from
            the ``router`` module's logits (its ``top_k`` largest); ``"grouped"`` (JetMoe):
            ``forward(x [N*k, D], expert_size)``, the rows grouped by expert in the order of the ``router``'s
            output ``(index_sorted_experts, batch_index, batch_gates, expert_size, logits)``; ``"one_hot"``
            (Switch Transformers): ``forward(hidden_states [N, D], selected [N, k, E] one-hot, weights [N, k])``,
            a slot with no expert (dropped over capacity) skipped.
        router: path inside a block of the router module (``"scaled"`` and ``"grouped"``).
        gated: gate/up experts (``gate_up_proj``) or up-only ones (``up_proj``).
        transposed: weights stored ``[E, in, out]`` instead of ``[E, out, in]``.
        concatenated: ``gate_up_proj`` holds ``[gate; up]``; False: interleaved (gpt-oss: gate = ``[..., ::2]``).
        bias: ``gate_up_proj_bias`` / ``up_proj_bias`` and ``down_proj_bias`` exist.
        gate_up: path inside the experts module of the gate/up weight (of the gate alone when ``up`` is set,
            of the up projection of up-only experts) when it is not ``gate_up_proj``/``up_proj``: a 3-D
            parameter ``[E, out, in]``, a 2-D one stacking the experts ``[E*out, in]`` (DBRX ``mlp.w1``), or,
            with ``{}`` for the expert's index, each expert's ``nn.Linear`` (``expert_{}.wi``: its bias too).
        up: path of a separate up weight, laid out as ``gate_up`` (DBRX ``mlp.v1``); ``""``: none.
        act: path of the activation module, ``{}`` for the expert's index; ``""``: the module's
            ``_apply_gate`` when it has one, else its ``act_fn``.
    """

    routing: str = "call"
    router: str = ""
    gated: bool | None = None
    transposed: bool | None = None
    concatenated: bool | None = None
    bias: bool | None = None
    gate_up: str = ""
    up: str = ""
    act: str = ""

    def __post_init__(self) -> None:
        if self.routing not in ROUTINGS:
            raise ValueError(f"ExpertsSpec: routing must be one of {ROUTINGS}, got {self.routing!r}")


@dataclass(frozen=True)
class FFNSite:
    """One FFN per block, located by module paths.

    Attributes:
        name: site family name; rows of a report are named ``f"{name}.{layer}"`` (``ffn.3``).
        blocks: dotted suffix of the path of the ``ModuleList``/``Sequential`` holding the blocks
            (``"h"`` matches ``transformer.h`` in ``GPT2LMHeadModel`` and ``h`` in ``GPT2Model``).
        pre: path inside a block of the module whose OUTPUT is the pre-activation
            (the up projection, or the gate projection of a gated FFN).
        post: path inside a block of the module whose INPUT (first positional argument) is the
            post-activation (the down projection).
        pre_chunk: ``(index, chunks)`` when ``pre`` is a fused projection: pre is
            ``output.chunk(chunks, dim=-1)[index]`` (Phi-3 ``gate_up_proj``: gate = ``(0, 2)``).
        kind: what the FFN is: ``"dense"`` (a plain FFN), ``"shared_expert"`` (an always-on expert beside
            routed ones) or ``"expert"`` (routed experts).
        stack: which stack of the model the blocks belong to (``"encoder"``, ``"decoder"``, ``"vision"``,
            ...); ``""`` for a model with one stack.
        tokens: the token source of that stack, by name (``nerve_hf.tracking.stack_tokens``):
            ``"attention_mask"`` (the call's mask, the default), ``"encoder"`` (the call's mask, on an
            encoder), ``"decoder"`` (``decoder_attention_mask``, else the labels' real positions, else all),
            ``"all"`` (every row: vision towers, audio encoders).
        optional: some models of the type lack this family altogether (``T5EncoderModel`` has no decoder;
            an MoE config may have no dense layers): when it resolves to nothing it is left out.
        experts: for ``kind="expert"``: how the experts compute. ``pre`` names the module whose call carries
            the routed inputs (hooked), ``post`` the module holding the experts' weights; both name the experts
            module, except where the routed rows reach a submodule (JetMoe: ``mlp.input_linear`` and ``mlp``).
    """

    name: str
    blocks: str
    pre: str
    post: str
    pre_chunk: tuple[int, int] | None = None
    kind: str = "dense"
    stack: str = ""
    tokens: str = "attention_mask"
    experts: ExpertsSpec | None = None
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"FFNSite {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if (self.kind == "expert") != (self.experts is not None):
            raise ValueError(f"FFNSite {self.name!r}: a site of kind 'expert' (and only one) needs `experts`")


@dataclass(frozen=True)
class Adapter:
    """Every FFN site family of one architecture.

    Attributes:
        sites: the site families; most transformers have exactly one.
        gated: True for GLU-style FFNs (post = act(gate) * up), informational.
    """

    sites: tuple[FFNSite, ...]
    gated: bool = False


@dataclass(frozen=True)
class ByConfig:
    """Adapters of one model type whose FFN modules depend on a config attribute (T5's ``is_gated_act``
    picks ``wi`` or ``wi_0``/``wi_1``).

    Attributes:
        attribute: the ``model.config`` attribute read.
        choices: ``(value, Adapter)`` pairs, or ``(value, reason)`` for a layout refused with that reason;
            a value not listed is refused with a message naming it.
    """

    attribute: str
    choices: tuple[tuple[object, Adapter | str], ...]

    def adapter_for(self, config) -> Adapter:
        value = getattr(config, self.attribute, None)
        for choice, adapter in self.choices:
            if value == choice and isinstance(adapter, str):
                raise ValueError(f"config.{self.attribute}={value!r} is refused: {adapter}")
            if value == choice:
                return adapter
        known = [choice for choice, _ in self.choices]
        raise ValueError(f"config.{self.attribute}={value!r} is not one of the known layouts {known}")


def ffn(blocks: str, pre: str, post: str, *, gated: bool = False, pre_chunk=None, tokens="attention_mask") -> Adapter:
    """Shorthand for the common case: one site family named ``ffn``."""
    return Adapter(sites=(FFNSite("ffn", blocks, pre, post, pre_chunk, tokens=tokens),), gated=gated)
