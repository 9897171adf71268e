"""Routed experts measured per expert, against an independent float64 recompute of every expert.

For each MoE family, built tiny from its config: the test's own hooks capture each experts module's call
and output; a float64 reference written here (not the library's) recomputes every expert from the
module's parameters, and must reproduce the module's output (router weights applied, summed). Each
expert's pre/post over the real (token, expert) assignments then gives reference metrics the tracker's
rows must match; token sums are real tokens x top-k per layer; outputs are bitwise equal with and
without the tracker; every experts implementation gives the same numbers.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import transformers as tf

from nerve_hf import FFNTracker
from nerve_hf.metrics import METRIC_NAMES
from nerve_hf.tracking.budget import MemoryBudgetError
from tests.reference import activation_metrics

ATTN = dict(num_attention_heads=2, num_key_value_heads=2, vocab_size=61, num_hidden_layers=2)


def _deepseek():
    return tf.DeepseekV3Config(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **ATTN,
    )  # fmt: skip


def _deepseek_sparse_attention(cls):
    """DeepSeek-V3.2 / GLM-MoE-DSA: DeepSeek-V3's MoE blocks (mlp_layer_types) under sparse attention."""
    return lambda: cls(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, mlp_layer_types=["dense", "sparse"], n_group=1, topk_group=1, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, index_topk=4, index_head_dim=16,
        index_n_heads=2, **ATTN,
    )  # fmt: skip


def _kimi_k25():
    """Kimi-K2.5: a vision tower (not run on text) and a DeepSeek-V3 language model."""
    text = _deepseek().to_dict()
    vision = dict(hidden_size=32, intermediate_size=48, num_attention_heads=2, num_hidden_layers=2)
    return tf.Kimi_K25Config(text_config=text, vision_config=vision, projection_hidden_size=32)


def _nemotron_h():
    """NemotronH: per block a mixer (here routed experts, attention, a dense MLP, routed experts again)."""
    return tf.NemotronHConfig(
        hidden_size=32, intermediate_size=48, moe_intermediate_size=16, moe_shared_expert_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, head_dim=16,
        layers_block_type=["moe", "full_attention", "mlp", "moe"], num_attention_heads=2, num_key_value_heads=2,
        vocab_size=61, num_hidden_layers=4, use_cache=False,
    )  # fmt: skip


def _jamba():
    return tf.JambaConfig(
        hidden_size=32, intermediate_size=48, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
        expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0, mamba_d_state=8, mamba_dt_rank=8,
        use_mamba_kernels=False, **ATTN,
    )  # fmt: skip


def _dbrx():
    return tf.DbrxConfig(
        d_model=32, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=61,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2),
    )  # fmt: skip


def _switch(capacity: int = 64):
    return lambda: tf.SwitchTransformersConfig(
        d_model=32, d_ff=48, d_kv=16, num_heads=2, num_layers=2, num_decoder_layers=2, num_experts=4,
        encoder_sparse_step=2, decoder_sparse_step=2, expert_capacity=capacity, vocab_size=61,
    )  # fmt: skip


def _config(cls, **kwargs):
    return lambda: cls.config_class(**kwargs, **ATTN)


# family -> (model class, config factory). The last five are not in the table: found by detect_moe_adapter.
FAMILIES = {
    "mixtral": (
        tf.MixtralForCausalLM,
        lambda: tf.MixtralConfig(
            hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **ATTN
        ),
    ),
    "qwen2_moe": (
        tf.Qwen2MoeForCausalLM,
        lambda: tf.Qwen2MoeConfig(
            hidden_size=32,
            intermediate_size=64,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            **ATTN,
        ),  # fmt: skip
    ),
    "qwen3_moe": (
        tf.Qwen3MoeForCausalLM,
        lambda: tf.Qwen3MoeConfig(
            hidden_size=32, moe_intermediate_size=32, num_experts=5, num_experts_per_tok=2, head_dim=16, **ATTN
        ),
    ),
    "olmoe": (
        tf.OlmoeForCausalLM,
        lambda: tf.OlmoeConfig(hidden_size=32, intermediate_size=32, num_experts=4, num_experts_per_tok=2, **ATTN),
    ),
    "gpt_oss": (
        tf.GptOssForCausalLM,
        lambda: tf.GptOssConfig(
            hidden_size=32,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=16,
            swiglu_limit=0.5,
            **ATTN,
        ),  # fmt: skip
    ),
    "deepseek_v3": (tf.DeepseekV3ForCausalLM, _deepseek),
    "deepseek_v32": (tf.DeepseekV32ForCausalLM, _deepseek_sparse_attention(tf.DeepseekV32Config)),
    "glm_moe_dsa": (tf.GlmMoeDsaForCausalLM, _deepseek_sparse_attention(tf.GlmMoeDsaConfig)),
    "jamba": (tf.JambaForCausalLM, _jamba),
    "kimi_k25": (tf.Kimi_K25ForConditionalGeneration, _kimi_k25),
    "nemotron_h": (tf.NemotronHForCausalLM, _nemotron_h),
    "ergo": (
        tf.ErgoForCausalLM,
        lambda: tf.ErgoConfig(
            hidden_size=32,
            first_dense_intermediate_size=48,
            moe_intermediate_size=16,
            shared_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_layer_types=["dense", "sparse"],
            head_dim=16,
            **ATTN,
        ),
    ),
    "flint": (
        tf.FlintForCausalLM,
        lambda: tf.FlintConfig(
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            mlp_only_layers=[0],
            head_dim=16,
            layer_types=["full_attention", "full_attention"],
            **ATTN,
        ),
    ),
    "beam": (
        tf.BeamForCausalLM,
        lambda: tf.BeamConfig(
            hidden_size=32,
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            n_group=1,
            topk_group=1,
            mlp_layer_types=["dense", "sparse"],
            head_dim=16,
            layer_types=["full_attention", "full_attention"],
            **ATTN,
        ),
    ),
    "dbrx": (tf.DbrxForCausalLM, _dbrx),
    "switch_transformers": (tf.SwitchTransformersForConditionalGeneration, _switch()),
    "jetmoe": (
        tf.JetMoeForCausalLM,
        lambda: tf.JetMoeConfig(
            hidden_size=32,
            intermediate_size=48,
            num_local_experts=4,
            num_experts_per_tok=2,
            kv_channels=16,
            num_key_value_heads=2,
            vocab_size=61,
            num_hidden_layers=2,
        ),
    ),
    "granitemoe": (
        tf.GraniteMoeForCausalLM,
        lambda: tf.GraniteMoeConfig(
            hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **ATTN
        ),
    ),
    "llama4": (
        tf.Llama4ForCausalLM,
        lambda: tf.Llama4TextConfig(
            hidden_size=32,
            intermediate_size=32,
            intermediate_size_mlp=48,
            num_local_experts=4,
            num_experts_per_tok=1,
            moe_layers=[1],
            head_dim=16,
            **ATTN,
        ),  # fmt: skip
    ),
}


# Not in the table: found by model_adapters.moe.detect_moe_adapter.
FAMILIES.update(
    glm4_moe=(
        tf.Glm4MoeForCausalLM,
        _config(
            tf.Glm4MoeForCausalLM, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=4,
            n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=16,
        ),
    ),
    ernie4_5_moe=(
        tf.Ernie4_5_MoeForCausalLM,
        _config(
            tf.Ernie4_5_MoeForCausalLM, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, head_dim=16,
        ),
    ),
    deepseek_v2=(
        tf.DeepseekV2ForCausalLM,
        _config(
            tf.DeepseekV2ForCausalLM, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, n_group=1,
            topk_group=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        ),
    ),
    phimoe=(
        tf.PhimoeForCausalLM,
        _config(tf.PhimoeForCausalLM, hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    ),
    minimax=(
        tf.MiniMaxForCausalLM,
        _config(
            tf.MiniMaxForCausalLM, hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
            head_dim=16,
        ),
    ),
)  # fmt: skip


def _build(family: str, implementation: str | None = None):
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config()).eval()
    with torch.no_grad():  # some families initialise expert weights to zeros: make every expert distinct
        for name, param in model.named_parameters():
            if "experts" in name or "router" in name or name.endswith("gate.weight"):
                param.normal_(0, 0.3)
    if implementation is not None:
        model.set_experts_implementation(implementation)
    return model


def _batch(model=None):
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, :4] = 0  # left padding
    batch = {"input_ids": ids, "attention_mask": mask}
    if model is not None and model.config.is_encoder_decoder:  # the decoder: another length, its own padding
        batch["decoder_input_ids"] = torch.randint(0, 61, (3, 9))
        batch["decoder_attention_mask"] = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 3 + [0] * 6])
    return batch


# Experts modules without a 3-D down_proj, by class name.
_OTHER_EXPERTS = ("DbrxExperts", "JetMoeMoE", "SwitchTransformersExperts")


def _experts_modules(model):
    return {
        name: module
        for name, module in model.named_modules()
        if (isinstance(getattr(module, "down_proj", None), torch.nn.Parameter) and module.down_proj.ndim == 3)
        or type(module).__name__ in _OTHER_EXPERTS
    }


def _n_experts(module) -> int:
    if type(module).__name__ == "JetMoeMoE":
        return module.router.num_experts
    return module.down_proj.shape[0] if hasattr(module, "down_proj") else module.num_experts


def _reference_expert(module, expert: int, x):
    """float64 (pre, post, output) of ``expert`` on rows ``x`` [n, D], written from each family's code."""
    x = x.double()
    name = type(module).__name__
    if name == "ErgoExperts":  # up-only experts [E, D, F]: relu(x @ up)^2 @ down, then the expert's RMSNorm
        pre = x @ module.up_proj[expert].double()
        post = torch.relu(pre) ** 2
        out = torch.nn.functional.rms_norm(
            post @ module.down_proj[expert].double(), (x.shape[-1],), eps=module.post_expert_norm.eps
        )
        return pre, post, out * module.post_expert_norm.weight[expert].double()
    if name == "NemotronHExperts":  # up-only experts: relu(x @ up.T)^2 @ down.T
        pre = x @ module.up_proj[expert].double().T
        post = torch.relu(pre) ** 2
        return pre, post, post @ module.down_proj[expert].double().T
    if name == "SwitchTransformersExperts":  # a T5 FFN per expert: relu(x @ wi.T) @ wo.T
        wi, wo = module[f"expert_{expert}"].wi.weight.double(), module[f"expert_{expert}"].wo.weight.double()
        pre = x @ wi.T
        return pre, torch.relu(pre), torch.relu(pre) @ wo.T
    if name == "JetMoeMoE":  # input_linear [E, 2F, D] ([gate; up]), output_linear [E, D, F]
        gate, up = (x @ module.input_linear.weight[expert].double().T).chunk(2, dim=-1)
        post = torch.nn.functional.silu(gate) * up
        return gate, post, post @ module.output_linear.weight[expert].double().T
    if name == "DbrxExperts":  # w1 (gate), v1 (up), w2 (down): each [E*F, D]; out = (silu(gate) * up) @ w2
        mlp = module.mlp
        w1, v1, w2 = (w.view(module.num_experts, -1, x.shape[-1])[expert].double() for w in (mlp.w1, mlp.v1, mlp.w2))
        gate = x @ w1.T
        post = torch.nn.functional.silu(gate) * (x @ v1.T)
        return gate, post, post @ w2
    down = module.down_proj[expert].double()
    if name == "GptOssExperts":  # [E, D, 2F] interleaved gate/up with biases, clamped SwiGLU
        gate_up = x @ module.gate_up_proj[expert].double() + module.gate_up_proj_bias[expert].double()
        gate, up = gate_up[:, ::2], gate_up[:, 1::2]
        clamped, up = gate.clamp(max=module.limit), up.clamp(-module.limit, module.limit)
        post = (up + 1) * clamped * torch.sigmoid(clamped * module.alpha)
        return gate, post, post @ down + module.down_proj_bias[expert].double()
    if name == "Llama4TextExperts":  # [E, D, 2F], [gate; up]
        gate, up = (x @ module.gate_up_proj[expert].double()).chunk(2, dim=-1)
        post = torch.nn.functional.silu(gate) * up
        return gate, post, post @ down
    gate, up = (x @ module.gate_up_proj[expert].double().T).chunk(2, dim=-1)  # [E, 2F, D], [gate; up]
    post = torch.nn.functional.silu(gate) * up
    return gate, post, post @ down.T


class _Capture:
    """The test's own hooks: each experts module's call and output, and Llama 4's router output."""

    def __init__(self, model):
        self.calls, self.handles = {}, []
        for name, module in _experts_modules(model).items():
            self.handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))
            parent = model.get_submodule(name.rpartition(".")[0])
            if hasattr(parent, "router") and type(parent).__name__ == "Llama4TextMoe":
                self.handles.append(parent.router.register_forward_hook(self._router(name)))

    def _hook(self, name):
        def hook(module, args, kwargs, output):
            values = list(args) + list(kwargs.values())
            self.calls.setdefault(name, {}).update(module=module, args=[v.detach() for v in values], output=output)

        return hook

    def _router(self, name):
        def hook(module, args, output):
            self.calls.setdefault(name, {})["router"] = (module, output[0].detach(), output[1].detach())

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _routing(module, args):
    """(hidden [N, D], top-k experts [N, k] (-1: dropped), weights [N, k], output bias) of one experts call."""
    if type(module).__name__ == "JetMoeMoE":  # called on [B, S, D]; routes inside: top-k logits, softmaxed
        hidden = args[0].reshape(-1, args[0].shape[-1])
        logits = module.router.layer(hidden).float()  # the model's own float32 logits: the same choice
        values, index = logits.topk(module.router.top_k, dim=1)
        return hidden, index, torch.softmax(values.double(), dim=1), module.bias.double()
    hidden, index, weights = args[:3]
    if type(module).__name__ == "SwitchTransformersExperts":  # one-hot [N, 1, E]; all zeros: dropped
        index = torch.where(index.sum(-1) > 0, index.argmax(-1), -1)
    return hidden.reshape(-1, hidden.shape[-1]), index, weights, 0.0  # DBRX: hidden [B, S, D]


@torch.no_grad()
def _reference(capture: _Capture, real_of):
    """layer name -> {expert: (pre [n, F], post [n, F])} over real assignments; checks each module's output."""
    out = {}
    for name, call in capture.calls.items():
        module, output = call["module"], call["output"].double()
        if "router" in call:  # Llama 4: inputs [E*N, D] scaled by router score; choice = top-k logits
            router, scores, logits = call["router"]
            n_experts = scores.shape[1]
            x = call["args"][0].reshape(n_experts, -1, call["args"][0].shape[-1])
            index = torch.topk(logits, router.top_k, dim=1).indices
            full = torch.stack([_reference_expert(module, e, x[e])[2] for e in range(n_experts)])  # [E, N, D]
            torch.testing.assert_close(full.reshape(output.shape), output, rtol=1e-4, atol=1e-5)
            rows = [(e, n, x[e, n]) for n in range(index.shape[0]) for e in index[n].tolist()]
        else:
            hidden, index, weights, bias = _routing(module, call["args"])
            output = output.reshape(-1, output.shape[-1])
            total = torch.zeros_like(output) + bias
            for n in range(index.shape[0]):
                for slot, e in enumerate(index[n].tolist()):
                    if e >= 0:  # -1: the slot was dropped (over capacity)
                        total[n] += weights[n, slot].double() * _reference_expert(module, e, hidden[n : n + 1])[2][0]
            torch.testing.assert_close(total, output, rtol=1e-4, atol=1e-5)
            rows = [(e, n, hidden[n]) for n in range(index.shape[0]) for e in index[n].tolist() if e >= 0]
        call["k"] = index.shape[1]
        per_expert, real = {}, real_of(name)
        for e, n, x in rows:
            if real[n]:
                pre, post, _ = _reference_expert(module, e, x[None])
                per_expert.setdefault(e, ([], []))
                per_expert[e][0].append(pre[0])
                per_expert[e][1].append(post[0])
        out[name] = {e: (torch.stack(a), torch.stack(b)) for e, (a, b) in per_expert.items()}
    return out


def _layer_of(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", name).group(1))  # the block index: layers.3 / blocks.3


def _close(got: float, want: float, rel=2e-4, abs=1e-6) -> bool:
    return (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=rel, abs=abs)


def _stack_of(name: str) -> str:
    """The stack of an experts module: an encoder-decoder's "encoder" / "decoder", a vision-language
    model's "text", else ""."""
    head = name.split(".")[0]
    return head if head in ("encoder", "decoder") else "text" if ".language_model." in name else ""


def _real_of(batch):
    """experts module name -> [N] bool: the real tokens of its stack (the decoder's mask for the decoder)."""
    return lambda name: (
        batch["decoder_attention_mask" if _stack_of(name) == "decoder" else "attention_mask"].reshape(-1).bool()
    )


def _check_against_reference(model, batch, every_slot: bool = True) -> dict:
    """The tracker's expert and routing rows against the float64 reference; outputs bitwise unchanged.
    ``every_slot``: every (real token, slot) reaches an expert (no capacity drop): tokens = real x top-k."""
    with torch.no_grad():
        plain = model(**batch).logits
    capture = _Capture(model)
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        tracked = model(**batch).logits
    capture.remove()
    assert torch.equal(plain, tracked)  # the model's outputs are bitwise unchanged
    report = tracker.compute()
    assert all(row["kind"] in ("dense", "shared_expert", "expert") for row in report.rows)
    real_of = _real_of(batch)
    reference = _reference(capture, real_of)
    assert reference, "the family has routed experts"
    routed = [row for row in report.rows if row["kind"] == "expert"]
    expert_rows = {(row["site"].partition("[")[0], row["layer"], row["expert"]): row for row in routed}
    routing = {(row["site"].rpartition(".")[0], row["layer"]): row for row in report.routing}
    layers = {}
    for name, experts in reference.items():
        stack, call, real = _stack_of(name), capture.calls[name], real_of(name)
        layer = (f"{stack}.experts" if stack else "experts", _layer_of(name))
        k, n_experts = call["k"], _n_experts(call["module"])
        layers[layer] = k
        layer_rows = [expert_rows[(*layer, e)] for e in range(n_experts)]
        assigned = sum(pre.shape[0] for pre, _ in experts.values())  # real (token, expert) assignments
        assert sum(row["tokens"] for row in layer_rows) == routing[layer]["assignments"] == assigned
        assert routing[layer]["tokens"] == int(real.sum())
        if every_slot:
            assert assigned == int(real.sum()) * k  # real tokens x top-k
        for e, row in enumerate(layer_rows):
            pre, post = experts.get(e, (torch.zeros(0, row["dim"]),) * 2)
            assert row["tokens"] == pre.shape[0] and row["dim"] == pre.shape[1]
            assert row.get("stack") == (stack or None)
            assert routing[layer]["assignments_per_expert"][e] == pre.shape[0]
            if pre.shape[0] < 2:
                assert all(math.isnan(row[m]) for m in METRIC_NAMES)
                continue
            want = activation_metrics(pre, post)
            for metric in METRIC_NAMES:
                assert _close(row[metric], want[metric]), (name, e, metric, row[metric], want[metric])
    assert set(layers) == {(row["site"].partition("[")[0], row["layer"]) for row in routed}
    return layers


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_expert_matches_float64_reference(family):
    model = _build(family)
    _check_against_reference(model, _batch(model))


def test_switch_tokens_dropped_over_capacity_are_not_counted():
    """Switch Transformers' router drops the tokens over an expert's capacity (2 per sequence here): they
    reach no expert, so they are in no expert's rows, though they are real tokens of the routing row."""
    FAMILIES["switch_capacity"] = (tf.SwitchTransformersForConditionalGeneration, _switch(capacity=2))
    try:
        model = _build("switch_capacity")
    finally:
        del FAMILIES["switch_capacity"]
    batch = _batch(model)
    layers = _check_against_reference(model, batch, every_slot=False)
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(**batch)
    routing = {row["site"]: row for row in tracker.compute().routing}
    assert set(routing) == {"encoder.experts.1", "decoder.experts.1"} and set(layers.values()) == {1}
    assert routing["encoder.experts.1"]["assignments"] < routing["encoder.experts.1"]["tokens"]  # some dropped


@pytest.mark.parametrize(
    "family",
    [
        "deepseek_v3",
        "deepseek_v32",
        "glm_moe_dsa",
        "qwen2_moe",
        "jamba",
        "llama4",
        "nemotron_h",
        "flint",
        "beam",
        "ergo",
    ],
)
def test_dense_and_shared_rows_say_their_kind_and_are_never_averaged_together(family):
    model, batch = _build(family), _batch()
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(**batch)
    report = tracker.compute()
    kinds = {row["kind"] for row in report.rows}
    assert "dense" in kinds and "expert" in kinds
    n_real = int(batch["attention_mask"].sum())
    for row in report.rows:
        if row["kind"] != "expert":
            assert row["tokens"] == n_real
    logs = report.to_log_dict()
    dense = [row for row in report.rows if row["kind"] == "dense"]
    assert logs["nerve/mean/pr_pre"] == pytest.approx(sum(r["pr_pre"] for r in dense) / len(dense))
    shared = [row for row in report.rows if row["kind"] == "shared_expert"]
    if shared:
        assert logs["nerve/mean/shared_expert/pr_pre"] == pytest.approx(sum(r["pr_pre"] for r in shared) / len(shared))
    assert not any(key.startswith("nerve/experts[") for key in logs)  # experts: per-layer summaries only


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen2_moe", "ergo", "nemotron_h", "beam"])
def test_every_experts_implementation_gives_the_same_numbers(family, implementation):
    rows = {}
    for impl in ("eager", implementation):
        model, batch = _build(family, impl), _batch()
        tracker = FFNTracker(model, flow=False)
        with tracker, torch.no_grad():
            model(**batch)
        rows[impl] = tracker.compute().rows
    assert [r["site"] for r in rows["eager"]] == [r["site"] for r in rows[implementation]]
    for a, b in zip(rows["eager"], rows[implementation]):
        assert a["tokens"] == b["tokens"]
        # Layer 0 sees the same inputs under every implementation: the same numbers. Later layers see
        # inputs that differ in float32 round-off, because the implementations' own outputs do.
        rel = 1e-9 if a["layer"] == 0 else 1e-5
        for metric in METRIC_NAMES:
            assert _close(a[metric], b[metric], rel=rel, abs=1e-12), (a["site"], metric)


def test_layer_summaries_and_router_statistics():
    model, batch = _build("mixtral"), _batch()
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(**batch)
    report = tracker.compute()
    logs = report.to_log_dict()
    for layer in (0, 1):
        rows = [r for r in report.rows if r["layer"] == layer]
        weight = sum(r["tokens"] for r in rows)
        mean = sum(r["pr_post"] * r["tokens"] for r in rows) / weight
        assert logs[f"nerve/experts.{layer}/pr_post_mean"] == pytest.approx(mean)
        assert logs[f"nerve/experts.{layer}/pr_post_min"] == min(r["pr_post"] for r in rows)
        gains = [r["pr_post"] / r["pr_pre"] for r in rows]
        assert logs[f"nerve/experts.{layer}/pr_gain_max"] == pytest.approx(max(gains))
        load = torch.tensor([float(r["tokens"]) for r in rows], dtype=torch.float64)
        cv = float(load.std(unbiased=False) / load.mean())
        assert logs[f"nerve/experts.{layer}/router/load_cv"] == pytest.approx(cv)
        assert logs[f"nerve/experts.{layer}/router/dead_fraction"] == float((load == 0).double().mean())
    # router entropy: mean over real tokens of the entropy of their normalised top-k weights
    capture = _Capture(model)
    with torch.no_grad():
        model(**batch)
    capture.remove()
    real = batch["attention_mask"].reshape(-1).bool()
    weights = capture.calls["model.layers.0.mlp.experts"]["args"][2][real].double()
    p = weights / weights.sum(-1, keepdim=True)
    assert logs["nerve/experts.0/router/router_entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()))


def test_expert_round_robin_and_subset_bound_the_state():
    model, batch = _build("mixtral"), _batch()
    per_expert = 2 * (48 * 48 + 48) * 8  # 2 x (F^2 + F) x 8 bytes
    routing = 2 * (4 + 2) * 8
    full = (2 * 4 * per_expert + routing) / 2**20
    with pytest.raises(MemoryBudgetError, match="routed expert"):
        FFNTracker(model, flow=False, memory_budget_mb=full * 0.9)  # refused at construction
    FFNTracker(model, flow=False, memory_budget_mb=full)
    tracker = FFNTracker(model, flow=False, experts_per_step=2, memory_budget_mb=(2 * 2 * per_expert + routing) / 2**20)
    seen = []
    for _ in range(2):
        with tracker, torch.no_grad():
            model(**batch)
        report = tracker.compute()
        seen.append(sorted({r["expert"] for r in report.rows}))
        assert len(report.routing) == 2 and report.routing[0]["assignments"] == int(batch["attention_mask"].sum()) * 2
        tracker.reset()
    assert seen == [[0, 1], [2, 3]]
    subset = FFNTracker(model, flow=False, experts=[3])
    with subset, torch.no_grad():
        model(**batch)
    assert {r["expert"] for r in subset.compute().rows} == {3}
    with pytest.raises(ValueError, match="has 4 experts"):
        FFNTracker(model, experts=[4])
    with pytest.raises(ValueError, match="not both"):
        FFNTracker(model, experts=[0], experts_per_step=1)


def test_training_step_gradients_unchanged_and_checkpoint_recompute_not_counted():
    batch = _batch()
    grads = []
    for tracked in (False, True):
        model = _build("qwen2_moe").train()
        model.activation_checkpointing_enable()
        tracker = FFNTracker(model, flow=False)
        if tracked:
            tracker.attach()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        tracker.detach()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        if tracked:
            report = tracker.compute()
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    n_real = int(batch["attention_mask"].sum())
    for row in report.routing:  # once per token, though checkpointing re-ran every block in backward
        assert (row["tokens"], row["assignments"]) == (n_real, 2 * n_real)


def test_granitemoe_shared_mlp_is_a_shared_expert():
    torch.manual_seed(0)
    config = tf.GraniteMoeSharedConfig(
        hidden_size=32, intermediate_size=48, shared_intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
        **ATTN,
    )  # fmt: skip
    model, batch = tf.GraniteMoeSharedForCausalLM(config).eval(), _batch()
    gate_rows = []
    handle = model.model.layers[0].shared_mlp.input_linear.register_forward_hook(
        lambda m, a, out: gate_rows.append(out.detach().chunk(2, dim=-1)[0])
    )
    post_rows = []
    handle2 = model.model.layers[0].shared_mlp.output_linear.register_forward_pre_hook(
        lambda m, a: post_rows.append(a[0].detach())
    )
    tracker = FFNTracker(model, flow=False)
    with tracker, torch.no_grad():
        model(**batch)
    handle.remove(), handle2.remove()
    report = tracker.compute()
    shared = [row for row in report.rows if row["kind"] == "shared_expert"]
    assert [row["site"] for row in shared] == ["shared_expert.0", "shared_expert.1"] and shared[0]["dim"] == 64
    real = batch["attention_mask"].bool()
    want = activation_metrics(gate_rows[0][real], post_rows[0][real])
    for metric in METRIC_NAMES:
        assert _close(shared[0][metric], want[metric]), metric
    assert {row["kind"] for row in report.rows} == {"shared_expert", "expert"}


def test_trainer_run_logs_layer_summaries_and_records_every_expert(tmp_path):
    import itertools
    import json

    from nerve_hf import NerveCallback

    model = _build("mixtral").train()
    torch.manual_seed(0)
    lengths = [12, 9, 7, 12, 5, 10, 12, 8]
    data = [
        {
            "input_ids": torch.randint(0, 61, (12,)),
            "attention_mask": torch.tensor([1] * n + [0] * (12 - n)),
            "labels": torch.randint(0, 61, (12,)),
        }
        for n in lengths
    ]
    args = tf.TrainingArguments(
        str(tmp_path), per_device_train_batch_size=4, max_steps=2, logging_steps=1, report_to=[], use_cpu=True
    )
    trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[NerveCallback(every_n_steps=1)])
    trainer.train()
    logs = [log for log in trainer.state.log_history if "nerve/mean/experts/pr_post_mean" in log]
    assert len(logs) == 2 and all("nerve/experts.1/router/load_cv" in log for log in logs)
    assert not any(key.startswith("nerve/experts[") for log in logs for key in log)
    records = [json.loads(line) for line in open(tmp_path / "nerve_metrics.jsonl")]
    per_step = {}
    for step in (1, 2):  # the Trainer shuffles: each step holds 4 of the samples, the two steps all 8
        sums = set()
        for layer in (0, 1):
            rows = [r for r in records if r["step"] == step and r["layer"] == layer]
            assert sorted(r["expert"] for r in rows) == [0, 1, 2, 3] and {r["kind"] for r in rows} == {"expert"}
            sums.add(sum(r["tokens"] for r in rows))
        assert len(sums) == 1  # every layer: the same real tokens x top-k
        per_step[step] = sums.pop()
    assert per_step[1] + per_step[2] == sum(lengths) * 2  # real tokens x top-k, never a pad
    assert per_step[1] in {2 * sum(four) for four in itertools.combinations(lengths, 4)}


def test_nllb_moe_is_refused_because_its_experts_ignore_the_router():
    """The refusal's reason, observed: NLLB-MoE's experts module runs experts 0 and 1 only, whatever the
    router chose (a transformers release that fixes it fails this test: then measure it instead)."""
    import model_adapters

    config = tf.NllbMoeConfig(
        d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, num_experts=4, vocab_size=61, encoder_sparse_step=2,
        decoder_sparse_step=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.NllbMoeForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match="does not run the experts its router chooses"):
        model_adapters.get_adapter(model)
    moe = model.model.encoder.layers[1].ffn
    ran, chosen = {}, []
    for e in range(4):
        moe.experts[f"expert_{e}"].fc1.register_forward_hook(lambda m, a, o, e=e: ran.__setitem__(e, a[0].shape[0]))
    moe.router.register_forward_hook(lambda m, a, out: chosen.append(out[0].sum(0)))
    ids = torch.randint(3, 61, (2, 9))
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids[:, :5])
    assert set(ran) <= {0, 1}  # only experts 0 and 1 ever run ...
    assert chosen[0][2:].sum() > 0 and ran.get(0, 0) > chosen[0][0]  # ... though the router chose others


def test_doge_dense_is_measured_and_its_single_neuron_experts_are_refused():
    """Doge's dense form is a gated MLP (measured, as the coverage test checks); its MoE form's routed experts
    are rows of two embeddings, one neuron each (refused: a 1 x 1 covariance has no spectrum)."""
    import model_adapters

    kwargs = dict(hidden_size=32, intermediate_size=48, num_experts=16, num_experts_per_tok=2, **ATTN)
    dense = tf.DogeForCausalLM(tf.DogeConfig(is_moe=False, **kwargs))
    assert [(s.pre, s.post) for s in model_adapters.get_adapter(dense).sites] == [("mlp.gate_proj", "mlp.down_proj")]
    moe = tf.DogeForCausalLM(tf.DogeConfig(is_moe=True, **kwargs))
    with pytest.raises(ValueError, match="is_moe=True is refused: DogeCDMoE routes each token to single-neuron"):
        model_adapters.get_adapter(moe)
    layer = moe.model.layers[0].mlp
    assert layer.down_embed.weight.shape == layer.up_embed.weight.shape == (16, 32)  # [E, D]: one neuron per expert


def test_a_failure_in_the_experts_hook_loses_the_window_and_never_stops_the_forward(monkeypatch):
    import warnings

    import nerve_hf.tracking.points as points
    from nerve_hf.tracking.windows import WindowLostError

    model, batch = _build("mixtral"), _batch()
    with torch.no_grad():
        plain = model(**batch).logits

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the experts' recompute")

    monkeypatch.setattr(points, "expert_rows", broken)
    with FFNTracker(model, flow=False) as tracker, torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = model(**batch).logits
        with pytest.raises(WindowLostError, match="experts: RuntimeError: out of memory"):
            tracker.compute()  # nothing of the lost window is reported as measured
    assert torch.equal(logits, plain)  # the forward ran to its end, unchanged
    lost = [str(w.message) for w in caught if "recording failed" in str(w.message)]
    assert len(lost) == 1 and "experts: RuntimeError: out of memory" in lost[0] and "window is lost" in lost[0]


def test_offloaded_fused_experts_are_refused_by_their_device():
    model = _build("mixtral")
    experts = next(iter(_experts_modules(model).values()))
    experts.to("meta")  # what accelerate leaves in place of weights offloaded to disk until the forward
    with pytest.raises(ValueError, match="weights offloaded .* cannot be recomputed"):
        FFNTracker(model, flow=False)
