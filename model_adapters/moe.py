"""Mixture-of-experts families: where each block's routed experts, shared expert and dense FFN are.

Most MoE blocks of transformers 5.x keep their routed experts fused in one module (``gate_up_proj
[E, 2F, D]`` and ``down_proj [E, D, F]``, or transposed) whose forward takes ``(hidden_states [N, D],
top_k_index [N, k], top_k_weights [N, k])``; there is no per-expert ``nn.Linear``. A site of kind
``"expert"`` names that module (``pre``: the module whose call is hooked; ``post``: the module holding the
weights; the same module but for JetMoe), and its :class:`~model_adapters.spec.ExpertsSpec` says how the
experts compute:

==============  ==============================  ===========================================================
family          experts module                  how an expert computes (pre / post)
==============  ==============================  ===========================================================
Mixtral, OLMoE,  ``mlp.experts``                 ``gate_up_proj [E, 2F, D]``, ``[gate; up]``: pre = gate,
Qwen2/3-MoE,                                     post = act(gate) * up (the module's ``_apply_gate``)
DeepSeek-V3/
V3.2, GLM-MoE-
DSA, Flint,
Beam, Kimi-K2.5
gpt-oss         ``mlp.experts``                 ``[E, D, 2F]`` (transposed), gate/up interleaved, biases:
                                                pre = gate columns + bias before the clamp, post = the
                                                module's clamped SwiGLU ``(up + 1) * gate * sigmoid(alpha gate)``
Jamba           ``feed_forward.experts``        as Mixtral, on the blocks that are MoE (others dense)
GraniteMoE      ``block_sparse_moe.experts``    as Mixtral; GraniteMoeShared adds ``shared_mlp`` (fused
                                                ``input_linear``: gate is its first half)
Llama 4         ``feed_forward.experts``        ``[E, D, 2F]``, ``[gate; up]``, input already scaled by the
                                                router score (sigmoid), every token repeated per expert; the
                                                choice is the router's top-k logits
DBRX            ``ffn.experts``                 gate ``mlp.w1``, up ``mlp.v1``, each ``[E*F, D]`` stacked:
                                                post = ``mlp.activation_fn(gate) * up``
JetMoe          ``mlp.input_linear`` / ``mlp``  the router groups the tokens by expert before
                                                ``input_linear [E, 2F, D]`` (``[gate; up]``); act
                                                ``mlp.activation`` (routing ``"grouped"``)
NemotronH       ``mixer.experts``               up-only ``up_proj [E, F, D]``: post = relu(pre)^2
Ergo            ``mlp.experts``                 up-only ``up_proj [E, D, F]`` (transposed): post = relu(pre)^2
                                                (the expert's RMSNorm follows the down projection)
Switch          ``layer.N.mlp.experts``         per-expert ``expert_{e}.wi`` -> act -> ``wo`` in the encoder
Transformers    (``model_adapters/seq2seq``)    and the decoder; top-1 one-hot choice, tokens over an
                                                expert's capacity dropped (routing ``"one_hot"``)
==============  ==============================  ===========================================================

Shared experts are sites of kind ``"shared_expert"``, dense FFNs (DeepSeek-V3's first layers, the
non-MoE blocks of Jamba/Llama 4/Qwen MoE with ``mlp_only_layers``) of kind ``"dense"``; both are
``optional`` families, present only in the blocks that have them. Doge's MoE form (single-neuron experts)
and NLLB-MoE (its experts ignore the router) are refused with their reasons (``model_adapters/refusals``).
"""

from __future__ import annotations

from torch import nn

from .spec import Adapter, ByConfig, ExpertsSpec, FFNSite, ffn
from .unwrap import module_index, unwrap_model

__all__ = ["ADAPTERS", "detect_moe_adapter", "moe_adapter"]


def moe_adapter(
    block: str,
    experts: str = "experts",
    *,
    blocks: str = "layers",
    spec: ExpertsSpec | None = None,
    shared: tuple[str, str] | None = None,
    shared_chunk: tuple[int, int] | None = None,
    dense: tuple[str, str] | None = ("gate_proj", "down_proj"),
    dense_block: str | None = None,
    stack: str = "",
) -> Adapter:
    """An MoE family: routed experts at ``{block}.{experts}``; optionally a shared expert
    (``(pre, post)`` paths inside a block, fused gate/up split by ``shared_chunk``) and dense FFNs
    (``(pre, post)`` under ``dense_block``, default ``block``) on the blocks that are not MoE. ``stack``:
    the stack of a model with several (site names ``{stack}.ffn``, ...; the call's attention_mask)."""
    name = (lambda family: f"{stack}.{family}") if stack else (lambda family: family)
    sites = []
    if dense is not None:
        prefix = dense_block or block
        sites.append(
            FFNSite(name("ffn"), blocks, f"{prefix}.{dense[0]}", f"{prefix}.{dense[1]}", stack=stack, optional=True)
        )
    if shared is not None:
        sites.append(
            FFNSite(
                name("shared_expert"),
                blocks,
                shared[0],
                shared[1],
                pre_chunk=shared_chunk,
                kind="shared_expert",
                stack=stack,
                optional=True,
            )
        )
    path = f"{block}.{experts}"
    spec = spec if spec is not None else ExpertsSpec()
    sites.append(FFNSite(name("experts"), blocks, path, path, kind="expert", experts=spec, stack=stack, optional=True))
    return Adapter(sites=tuple(sites), gated=True)


_MLP = moe_adapter("mlp")
_QWEN2_MOE = moe_adapter("mlp", shared=("mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj"))
_DEEPSEEK_SHARED = ("mlp.shared_experts.gate_proj", "mlp.shared_experts.down_proj")
_DEEPSEEK = moe_adapter("mlp", shared=_DEEPSEEK_SHARED)
# Kimi-K2.5: a vision tower (fc1 -> act -> fc2, every patch row) and a DeepSeek-V3 language model
_KIMI_K25 = Adapter(
    sites=(
        FFNSite("vision.ffn", "vision_tower.layers", "mlp.fc1", "mlp.fc2", stack="vision", tokens="all"),
        *moe_adapter("mlp", blocks="language_model.layers", shared=_DEEPSEEK_SHARED, stack="text").sites,
    ),
    gated=True,
)
_LLAMA4 = moe_adapter(
    "feed_forward",
    spec=ExpertsSpec(
        routing="scaled", router="feed_forward.router", gated=True, transposed=True, concatenated=True, bias=False
    ),
    shared=("feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.down_proj"),
)

# DBRX: per expert, gate = w1 and up = v1 (each [E*F, D], stacked), act(gate) * up, out = . @ w2
_DBRX = moe_adapter(
    "ffn",
    blocks="blocks",
    dense=None,
    spec=ExpertsSpec(gated=True, transposed=False, bias=False, gate_up="mlp.w1", up="mlp.v1", act="mlp.activation_fn"),
)

# JetMoe: the router groups the tokens by expert before mlp.input_linear ([E, 2F, D], [gate; up]);
# act = mlp.activation. Its attention experts (self_attention.experts) are not FFNs.
_JETMOE = Adapter(
    sites=(
        FFNSite(
            "experts",
            "layers",
            "mlp.input_linear",
            "mlp",
            kind="expert",
            experts=ExpertsSpec(
                routing="grouped", router="mlp.router", gated=True, transposed=False, concatenated=True,
                bias=False, gate_up="input_linear.weight", act="activation",
            ),
        ),
    ),
    gated=True,
)  # fmt: skip

# Doge: a gated MLP, or (is_moe) DogeCDMoE, whose routed experts are single neurons
_DOGE = ByConfig(
    "is_moe",
    (
        (False, ffn("layers", pre="mlp.gate_proj", post="mlp.down_proj", gated=True)),
        (
            True,
            "DogeCDMoE routes each token to single-neuron experts, rows of down_embed/up_embed (nn.Embedding, "
            "modeling_doge.py:401-402) whose pre-activation is one scalar per token (line 431): a 1 x 1 covariance "
            "has no spectrum to measure",
        ),
    ),
)

# config.model_type -> Adapter
ADAPTERS = {
    "doge": _DOGE,
    "jetmoe": _JETMOE,
    "dbrx": _DBRX,
    "mixtral": _MLP,
    "olmoe": _MLP,
    "qwen3_moe": _MLP,
    "gpt_oss": _MLP,
    "qwen2_moe": _QWEN2_MOE,
    "flint": _QWEN2_MOE,  # Qwen2-MoE's layout; its shared expert is added without a gate
    "beam": _MLP,  # dense mlp_layer_types blocks and routed experts (their own fp32 _apply_gate)
    "deepseek_v3": _DEEPSEEK,
    "deepseek_v32": _DEEPSEEK,
    "glm_moe_dsa": _DEEPSEEK,
    "kimi_k25": _KIMI_K25,
    "jamba": moe_adapter("feed_forward"),
    "granitemoe": moe_adapter("block_sparse_moe", dense=None),
    "granitemoeshared": moe_adapter(
        "block_sparse_moe",
        dense=None,
        shared=("shared_mlp.input_linear", "shared_mlp.output_linear"),
        shared_chunk=(0, 2),
    ),
    "llama4_text": _LLAMA4,
    # Ergo: dense first blocks (up -> relu^2 -> down), up-only experts [E, D, F] (transposed) whose per-expert
    # RMSNorm follows the down projection, and a shared expert (its norm after down_proj too)
    "ergo": moe_adapter(
        "mlp",
        dense=("up_proj", "down_proj"),
        shared=("mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
        spec=ExpertsSpec(gated=False, transposed=True, bias=False),
    ),
    # NemotronH: each block's mixer is Mamba-2, attention, a dense MLP (up -> relu^2 -> down) or an MoE of
    # up-only experts (has_gate=False) with a shared MLP expert
    "nemotron_h": moe_adapter(
        "mixer",
        dense=("up_proj", "down_proj"),
        shared=("mixer.shared_experts.up_proj", "mixer.shared_experts.down_proj"),
    ),
}


def _is_fused_experts(module: nn.Module) -> bool:
    """A routed-experts module of transformers' ``use_experts_implementation`` convention (the decorator
    sets ``is_concatenated``): 3-D ``down_proj`` and ``gate_up_proj`` or ``up_proj``, called with the routing."""
    down = getattr(module, "down_proj", None)
    up = (
        getattr(module, "gate_up_proj", None) if getattr(module, "has_gate", True) else getattr(module, "up_proj", None)
    )
    return (
        hasattr(module, "is_concatenated")
        and isinstance(down, nn.Parameter)
        and isinstance(up, nn.Parameter)
        and down.ndim == 3
        and up.ndim == 3
    )


def _gated_mlp(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_proj", None), nn.Linear) and isinstance(
        getattr(module, "down_proj", None), nn.Linear
    )


def detect_moe_adapter(model: nn.Module) -> Adapter | None:
    """An adapter for an MoE model the table does not know, from its structure: the blocks of a
    ``ModuleList`` holding fused experts modules (:func:`_is_fused_experts`), each block's gated MLP whose
    path names ``shared`` as its shared expert, and the other gated MLPs (``gate_proj``/``down_proj``) as
    dense FFNs. None when no fused experts module is found."""
    index = module_index(unwrap_model(model))
    for cpath, container in index.items():
        if not isinstance(container, nn.ModuleList):
            continue
        experts, shared, dense = set(), set(), set()
        for block in container:
            for path, module in block.named_modules():
                if _is_fused_experts(module):
                    experts.add(path)
                elif path and _gated_mlp(module) and not any(p in experts for p in _parents(path)):
                    (shared if "shared" in path else dense).add(path)
        if not experts:
            continue
        if len(experts) > 1 or len(shared) > 1 or len(dense) > 1:
            return None  # several candidates per block: refuse rather than guess
        sites = [FFNSite("ffn", cpath, f"{p}.gate_proj", f"{p}.down_proj", optional=True) for p in dense]
        sites += [
            FFNSite("shared_expert", cpath, f"{p}.gate_proj", f"{p}.down_proj", kind="shared_expert", optional=True)
            for p in shared
        ]
        path = experts.pop()
        sites.append(FFNSite("experts", cpath, path, path, kind="expert", experts=ExpertsSpec(), optional=True))
        return Adapter(sites=tuple(sites), gated=True)
    return None


def _parents(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts))]
