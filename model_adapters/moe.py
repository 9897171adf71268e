"""Mixture-of-experts families: where each block's routed experts, shared expert and dense FFN are.

Every MoE block of transformers 5.x keeps its routed experts fused in one module (``gate_up_proj
[E, 2F, D]`` and ``down_proj [E, D, F]``, or transposed) whose forward takes ``(hidden_states [N, D],
top_k_index [N, k], top_k_weights [N, k])``; there is no per-expert ``nn.Linear``. A site of kind
``"expert"`` names that module (``pre`` and ``post`` both), and its :class:`~model_adapters.spec.ExpertsSpec`
says how the experts compute:

==============  ==============================  ===========================================================
family          experts module                  how an expert computes (pre / post)
==============  ==============================  ===========================================================
Mixtral, OLMoE,  ``mlp.experts``                 ``gate_up_proj [E, 2F, D]``, ``[gate; up]``: pre = gate,
Qwen2/3-MoE,                                     post = act(gate) * up (the module's ``_apply_gate``)
DeepSeek-V3
gpt-oss         ``mlp.experts``                 ``[E, D, 2F]`` (transposed), gate/up interleaved, biases:
                                                pre = gate columns + bias before the clamp, post = the
                                                module's clamped SwiGLU ``(up + 1) * gate * sigmoid(alpha gate)``
Jamba           ``feed_forward.experts``        as Mixtral, on the blocks that are MoE (others dense)
GraniteMoE      ``block_sparse_moe.experts``    as Mixtral; GraniteMoeShared adds ``shared_mlp`` (fused
                                                ``input_linear``: gate is its first half)
Llama 4         ``feed_forward.experts``        ``[E, D, 2F]``, ``[gate; up]``, input already scaled by the
                                                router score (sigmoid), every token repeated per expert; the
                                                choice is the router's top-k logits
==============  ==============================  ===========================================================

Shared experts are sites of kind ``"shared_expert"``, dense FFNs (DeepSeek-V3's first layers, the
non-MoE blocks of Jamba/Llama 4/Qwen MoE with ``mlp_only_layers``) of kind ``"dense"``; both are
``optional`` families, present only in the blocks that have them.
"""

from __future__ import annotations

from .spec import Adapter, ExpertsSpec, FFNSite

__all__ = ["ADAPTERS", "moe_adapter"]


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
) -> Adapter:
    """An MoE family: routed experts at ``{block}.{experts}``; optionally a shared expert
    (``(pre, post)`` paths inside a block, fused gate/up split by ``shared_chunk``) and dense FFNs
    (``(pre, post)`` under ``dense_block``, default ``block``) on the blocks that are not MoE."""
    sites = []
    if dense is not None:
        prefix = dense_block or block
        sites.append(FFNSite("ffn", blocks, f"{prefix}.{dense[0]}", f"{prefix}.{dense[1]}", optional=True))
    if shared is not None:
        sites.append(
            FFNSite(
                "shared_expert",
                blocks,
                shared[0],
                shared[1],
                pre_chunk=shared_chunk,
                kind="shared_expert",
                optional=True,
            )
        )
    path = f"{block}.{experts}"
    spec = spec if spec is not None else ExpertsSpec()
    sites.append(FFNSite("experts", blocks, path, path, kind="expert", experts=spec, optional=True))
    return Adapter(sites=tuple(sites), gated=True)


_MLP = moe_adapter("mlp")
_LLAMA4 = moe_adapter(
    "feed_forward",
    spec=ExpertsSpec(
        routing="scaled", router="feed_forward.router", gated=True, transposed=True, concatenated=True, bias=False
    ),
    shared=("feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.down_proj"),
)

# config.model_type -> Adapter
ADAPTERS = {
    "mixtral": _MLP,
    "olmoe": _MLP,
    "qwen3_moe": _MLP,
    "gpt_oss": _MLP,
    "qwen2_moe": moe_adapter("mlp", shared=("mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj")),
    "deepseek_v3": moe_adapter("mlp", shared=("mlp.shared_experts.gate_proj", "mlp.shared_experts.down_proj")),
    "jamba": moe_adapter("feed_forward"),
    "granitemoe": moe_adapter("block_sparse_moe", dense=None),
    "granitemoeshared": moe_adapter(
        "block_sparse_moe",
        dense=None,
        shared=("shared_mlp.input_linear", "shared_mlp.output_linear"),
        shared_chunk=(0, 2),
    ),
    "llama4_text": _LLAMA4,
}
