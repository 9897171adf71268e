"""Tests of nerve_zoo: every variant trains a step, each transformation does what it says."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import nerve_zoo as zoo

VOCAB = 97  # odd vocabulary of the tiny presets


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: thread start-up costs more than it saves, and 2 cores are shared with other jobs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loss(model: nn.Module, family: str, generator: torch.Generator) -> torch.Tensor:
    if family == "mixer":
        images = torch.randn(4, 3, 16, 16, generator=generator)  # [batch, C, H, W]
        labels = torch.randint(0, 10, (4,), generator=generator)
        return nn.functional.cross_entropy(model(images), labels)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=generator)  # [batch, seq]
    return model(input_ids=tokens, labels=tokens).loss


# --------------------------------------------------------------------------- every variant


@pytest.mark.parametrize("name", list(zoo.VARIANTS))
def test_every_variant_trains(name):
    torch.manual_seed(0)
    variant = zoo.VARIANTS[name]
    model = zoo.build_model(name, size="tiny", **({"vocab_size": VOCAB} if variant.family != "mixer" else {}))
    optimizer = zoo.build_optimizer("adamw", model, lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(3):  # same batch three times: the loss must fall
        optimizer.zero_grad()
        loss = _loss(model, variant.family, torch.Generator().manual_seed(1))
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # after the first step (timm zero-initialises the Mixer head) gradients reach most tensors
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > len(list(model.parameters())) // 2, with_grad
    assert variant.section and variant.description


def test_registry_rejects_unknown_names():
    with pytest.raises(ValueError, match="gpt2-gelu"):
        zoo.build_model("gpt2-swish")
    with pytest.raises(ValueError, match="tiny"):
        zoo.build_model("gpt2-gelu", size="huge")
    assert set(zoo.list_variants("llama")) == {"llama-rope", "llama-nope"}


def test_listing_variants_imports_neither_transformers_nor_timm_and_builds_record_provenance():
    code = (
        "import sys; import nerve_zoo as zoo; names = list(zoo.VARIANTS);"
        "assert 'transformers' not in sys.modules and 'timm' not in sys.modules, 'heavy import';"
        "print(len(names))"
    )
    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(zoo.VARIANTS) == 22  # 21 + llama-moe (issue 27)
    assert zoo.build_model("gpt2-mixln").config.nerve_zoo_variant == "gpt2-mixln"


# --------------------------------------------------------------------------- GPT-2 transformations


def test_activation_variants_set_the_ffn_nonlinearity():
    relu = zoo.build_model("gpt2-relu")
    x = torch.linspace(-2, 2, 9)
    assert torch.equal(relu.transformer.h[0].mlp.act(x), torch.relu(x))
    gelu = zoo.build_model("gpt2-gelu")
    assert torch.allclose(gelu.transformer.h[0].mlp.act(x), nn.functional.gelu(x), atol=1e-6)


def test_normfree_leaves_no_layernorm():
    model = zoo.build_model("gpt2-normfree-relu")
    assert not [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert isinstance(model.transformer.ln_f, nn.Identity)
    assert all(isinstance(b.ln_1, nn.Identity) and isinstance(b.ln_2, nn.Identity) for b in model.transformer.h)
    # the baseline has 2 per block + ln_f
    baseline = zoo.build_model("gpt2-gelu")
    assert sum(isinstance(m, nn.LayerNorm) for m in baseline.modules()) == 2 * 2 + 1


def test_learnable_leaky_relu_slope_is_per_layer_and_trained():
    model = zoo.build_model("gpt2-normfree-lrelu")
    acts = [block.mlp.act for block in model.transformer.h]
    assert all(isinstance(a, zoo.LearnableLeakyReLU) for a in acts)
    assert acts[0].negative_slope is not acts[1].negative_slope
    x = torch.tensor([-2.0, 3.0])
    assert torch.allclose(acts[0](x), torch.tensor([-0.02, 3.0]))
    optimizer = zoo.build_optimizer("adamw", model, lr=1e-2, weight_decay=0.1)
    _loss(model, "gpt2", torch.Generator().manual_seed(0)).backward()
    assert acts[0].negative_slope.grad is not None and acts[0].negative_slope.grad != 0
    optimizer.step()
    assert acts[0].negative_slope.item() != pytest.approx(0.01, abs=1e-6)


@pytest.mark.parametrize(
    "name, parametrization",
    [("gpt2-wnorm", "_WeightNorm"), ("gpt2-snorm", "_SpectralNorm"), ("gpt2-hnorm", "UnitNorm")],
)
def test_ffn_weight_norm_parametrisations_on_c_fc_and_c_proj(name, parametrization):
    from torch.nn.utils import parametrize

    model = zoo.build_model(name)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())  # built on NormFree
    for block in model.transformer.h:
        for projection in (block.mlp.c_fc, block.mlp.c_proj):
            assert parametrize.is_parametrized(projection, "weight")
            assert [type(p).__name__ for p in projection.parametrizations.weight] == [parametrization]
        # attention projections are untouched
        assert not parametrize.is_parametrized(block.attn.c_attn)


def test_weight_norm_has_one_gain_per_output_unit():
    model = zoo.build_model("gpt2-wnorm")
    c_fc = model.transformer.h[0].mlp.c_fc  # Conv1D weight [in=32, out=128]
    gain, direction = c_fc.parametrizations.weight.original0, c_fc.parametrizations.weight.original1
    assert gain.shape == (1, 128) and direction.shape == (32, 128)
    assert torch.allclose(c_fc.weight.norm(dim=0), gain.squeeze(0), atol=1e-6)


def test_spectral_norm_gives_unit_top_singular_value():
    torch.manual_seed(0)
    model = zoo.build_model("gpt2-snorm").train()
    for block in model.transformer.h:
        for projection in (block.mlp.c_fc, block.mlp.c_proj):
            # sigma is estimated by power iteration (15 steps at registration, one per access in training
            # mode); random matrices have close top singular values, so let it converge first
            for _ in range(200):
                weight = projection.weight
            sigma = torch.linalg.matrix_norm(weight.detach(), ord=2)
            assert sigma == pytest.approx(1.0, rel=1e-3)


def test_hnorm_output_unit_weight_vectors_have_unit_norm_also_after_a_step():
    model = zoo.build_model("gpt2-hnorm")
    optimizer = zoo.build_optimizer("adamw", model, lr=0.1)
    _loss(model, "gpt2", torch.Generator().manual_seed(0)).backward()
    optimizer.step()
    for block in model.transformer.h:
        for projection, n_out in ((block.mlp.c_fc, 128), (block.mlp.c_proj, 32)):
            norms = projection.weight.detach().norm(dim=0)  # Conv1D [in, out]: one column per output unit
            assert norms.shape == (n_out,)
            assert torch.allclose(norms, torch.ones(n_out), atol=1e-5)
            assert not torch.allclose(projection.weight.norm(dim=1), torch.ones(projection.weight.shape[0]))


def test_postln_block_computes_ln_of_residual_sum():
    torch.manual_seed(0)
    model = zoo.build_model("gpt2-postln").eval()
    block = model.transformer.h[0]
    assert isinstance(block, zoo.PostLNBlock)
    x = torch.randn(2, 5, 32)  # [batch, seq, d]
    with torch.no_grad():
        attn_out, _ = block.attn(x)
        h = nn.functional.layer_norm(x + attn_out, (32,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        mlp_out = block.mlp.c_proj(nn.functional.gelu(block.mlp.c_fc(h)))
        expected = nn.functional.layer_norm(h + mlp_out, (32,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        preln = x + attn_out  # PreLN order gives a different result
        got = block(x)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, preln, atol=1e-2)
    # output is layer-normalised per token: zero mean, unit variance before the affine (1, 0 at init)
    assert torch.allclose(got.mean(-1), torch.zeros(2, 5), atol=1e-5)


def test_postln_keeps_parameters_hidden_states_and_cached_generation():
    torch.manual_seed(0)
    pre = zoo.build_model("gpt2-preln")
    names_pre = [n for n, _ in pre.named_parameters()]
    torch.manual_seed(0)
    post = zoo.build_model("gpt2-postln").eval()
    assert [n for n, _ in post.named_parameters()] == names_pre  # same state-dict keys / FFN paths
    tokens = torch.randint(0, VOCAB, (1, 6))
    out = post(input_ids=tokens, output_hidden_states=True)
    assert len(out.hidden_states) == 2 + 1
    with_cache = post.generate(tokens, max_new_tokens=5, do_sample=False, use_cache=True)
    without_cache = post.generate(tokens, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without_cache)


def test_postln_supports_gradient_checkpointing():
    model = zoo.build_model("gpt2-postln")
    model.activation_checkpointing_enable()
    model.train()
    loss = _loss(model, "gpt2", torch.Generator().manual_seed(0))
    loss.backward()
    assert model.transformer.h[0].gradient_checkpointing
    assert model.transformer.h[0].mlp.c_fc.weight.grad is not None


@pytest.mark.parametrize("n_layer, expected_post", [(2, 1), (4, 1), (12, 3), (13, 4)])
def test_mixln_puts_postln_in_the_first_quarter(n_layer, expected_post):
    model = zoo.build_model("gpt2-mixln", n_layer=n_layer)
    kinds = [isinstance(block, zoo.PostLNBlock) for block in model.transformer.h]
    assert kinds == [True] * expected_post + [False] * (n_layer - expected_post)


def test_normfree_with_norm_position_is_refused():
    with pytest.raises(ValueError, match="NormFree"):
        zoo.build_gpt2(layernorm=False, norm_position="post")


@pytest.mark.parametrize("mult", [1, 2, 4, 8])
def test_width_sweep_sets_ffn_width(mult):
    model = zoo.build_model(f"gpt2-width-{mult}x")
    assert model.transformer.h[0].mlp.c_fc.nf == mult * 32
    assert model.config.n_inner == mult * 32


# --------------------------------------------------------------------------- LLaMA NoPE


def _layer0_qk(model, tokens) -> list[torch.Tensor]:
    """q and k of layer 0 after the rotary step, captured inside the attention call."""
    from transformers import AttentionInterface
    from transformers.models.llama.modeling_llama import eager_attention_forward

    captured = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx == 0:
            captured.extend([query.detach(), key.detach()])  # [batch, heads, seq, head_dim]
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("nerve_capture_qk", capture)
    model.set_attn_implementation("nerve_capture_qk")
    with torch.no_grad():
        model(input_ids=tokens)
    return captured


def test_nope_attention_inputs_are_position_invariant():
    tokens = torch.full((1, 7), 5)  # one token repeated at 7 positions
    torch.manual_seed(0)
    nope = zoo.build_model("llama-nope")
    assert isinstance(nope.model.rotary_emb, zoo.NoRotaryEmbedding)
    for qk in _layer0_qk(nope, tokens):
        assert torch.allclose(qk, qk[:, :, :1].expand_as(qk), atol=1e-6)
    torch.manual_seed(0)
    rope = zoo.build_model("llama-rope")  # control: same weights, RoPE makes positions differ
    q, k = _layer0_qk(rope, tokens)
    assert (q[:, :, 1:] - q[:, :, :1]).abs().amax() > 1e-3
    assert (k[:, :, 1:] - k[:, :, :1]).abs().amax() > 1e-3


def test_one_layer_nope_model_ignores_token_order():
    # one layer, no positions: the last token attends to the *set* of tokens, so order cannot matter
    tokens = torch.tensor([[3, 17, 42, 8, 60]])
    shuffled = torch.tensor([[42, 3, 8, 17, 60]])
    for name, invariant in (("llama-nope", True), ("llama-rope", False)):
        torch.manual_seed(0)
        model = zoo.build_model(name, num_hidden_layers=1).eval()
        with torch.no_grad():
            a, b = model(input_ids=tokens).logits[0, -1], model(input_ids=shuffled).logits[0, -1]
        assert torch.allclose(a, b, atol=1e-5) == invariant, name


# --------------------------------------------------------------------------- optimizers


def test_split_parameters_sends_only_hidden_matrices_to_the_matrix_optimizer():
    model = zoo.build_model("gpt2-wnorm")
    split = zoo.split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    matrices = {names[id(p)] for p in split.matrices + split.matrices_transposed}
    assert "transformer.wte.weight" not in matrices and "transformer.wpe.weight" not in matrices
    assert all("original0" not in n for n in matrices)  # weight-norm gains [1, out] are not matrices
    assert "transformer.h.0.attn.c_attn.weight" in {names[id(p)] for p in split.matrices_transposed}
    assert "transformer.h.0.mlp.c_fc.parametrizations.weight.original1" in matrices
    assert all(p.ndim == 2 for p in split.matrices_transposed)
    assert not split.matrices  # every GPT-2 hidden matrix is a Conv1D
    llama = zoo.build_model("llama-rope")
    llama_split = zoo.split_parameters(llama)
    assert id(llama.lm_head.weight) not in {id(p) for p in llama_split.matrices}
    assert id(llama.model.embed_tokens.weight) not in {id(p) for p in llama_split.matrices}
    assert len(llama_split.matrices) == 2 * 7  # q k v o gate up down per layer


def test_muon_wrapper_steps_both_groups_and_follows_the_scheduler():
    torch.manual_seed(0)
    model = zoo.build_model("gpt2-gelu")
    optimizer = zoo.build_optimizer("muon", model, lr=1e-2, weight_decay=0.1)
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert muon.param_groups[0]["lr"] == adamw.param_groups[0]["lr"] == pytest.approx(5e-3)
    c_fc, wte, bias = (
        model.transformer.h[0].mlp.c_fc.weight,
        model.transformer.wte.weight,
        model.transformer.h[0].mlp.c_fc.bias,
    )
    before = [t.detach().clone() for t in (c_fc, wte, bias)]
    _loss(model, "gpt2", torch.Generator().manual_seed(0)).backward()
    optimizer.step()
    scheduler.step()
    assert all(not torch.equal(b, t) for b, t in zip(before, (c_fc, wte, bias)))
    assert c_fc in muon.state and "momentum_buffer" in muon.state[c_fc]
    assert wte in adamw.state and bias in adamw.state and c_fc not in adamw.state
    # Muon's step is orthogonalised (Newton-Schulz): its leading singular values are flattened
    # compared with the gradient's (the gradient of 24 tokens has rank <= 24, so look at the top 8)
    delta = (c_fc.detach() - before[0] * (1 - 5e-3 * 0.1)).double()
    s_update, s_grad = torch.linalg.svdvals(delta), torch.linalg.svdvals(c_fc.grad.double())
    assert s_update[7] / s_update[0] > 0.6
    assert s_update[7] / s_update[0] > 1.5 * s_grad[7] / s_grad[0]
    # state dict round trip
    restored = zoo.build_optimizer("muon", model, lr=1e-2, weight_decay=0.1)
    restored.load_state_dict(optimizer.state_dict())
    assert torch.equal(restored.optimizers[0].state[c_fc]["momentum_buffer"], muon.state[c_fc]["momentum_buffer"])
    assert restored.param_groups[0] is restored.optimizers[0].param_groups[0]
    optimizer.zero_grad()
    assert c_fc.grad is None and wte.grad is None


def test_combined_optimizer_under_transformers_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments, get_scheduler

    torch.manual_seed(0)
    model = zoo.build_model("gpt2-relu")
    tokens = torch.randint(0, VOCAB, (8, 12))
    train = [{"input_ids": t, "labels": t} for t in tokens]
    optimizer = zoo.build_optimizer("dion", model, lr=1e-2, weight_decay=0.1, rank_fraction=0.5)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=4)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(optimizer, scheduler))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    dion, adamw = optimizer.optimizers
    assert dion.state and adamw.state
    # linear decay over 4 steps, 2 taken: both inner optimizers sit at half the peak lr
    assert dion.param_groups[0]["lr"] == pytest.approx(5e-3)
    assert adamw.param_groups[0]["lr"] == pytest.approx(5e-3)


def test_sgd_and_adam_for_the_mixer():
    model = zoo.build_model("mixer-relu-gelu")
    for name, kind in (("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)):
        optimizer = zoo.build_optimizer(name, model, lr=0.1, weight_decay=1e-4)
        assert type(optimizer) is kind
        decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert id(model.blocks[0].mlp_channels.fc1.weight) in decay
        assert id(model.blocks[0].mlp_channels.fc1.bias) not in decay
    with pytest.raises(ValueError, match="adamw"):
        zoo.build_optimizer("lion", model, lr=0.1)


# --------------------------------------------------------------------------- Dion


def _matrix_with_spectrum(m: int, n: int, singular_values, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = len(singular_values)
    return u[:, :k] @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v[:, :k].T


def test_dion_left_factor_is_orthonormal_and_error_feedback_is_exact():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(12, 7, generator=g, dtype=torch.float64)
    buffer = torch.randn(12, 7, generator=g, dtype=torch.float64)
    q = torch.randn(7, 3, generator=g, dtype=torch.float64)
    step = zoo.dion_power_step(buffer, grad, q, mu=0.9)
    assert step.p.shape == (12, 3) and step.q.shape == (7, 3)
    assert torch.allclose(step.p.T @ step.p, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(step.q.norm(dim=0), torch.ones(3, dtype=torch.float64))
    # M_new = (M + G) - (1 - mu) P R^T, with P R^T the projection of B onto span(P)
    b = buffer + grad
    assert torch.allclose(step.buffer, b - 0.1 * step.p @ step.p.T @ b, atol=1e-10)
    assert torch.linalg.matrix_rank(step.p @ step.q.T) == 3


def test_dion_full_rank_update_becomes_orthonormal_under_a_fixed_gradient():
    grad = _matrix_with_spectrum(9, 4, [8.0, 4.0, 2.0, 1.0])
    q = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    buffer = torch.zeros_like(grad)
    for _ in range(40):
        step = zoo.dion_power_step(buffer, grad, q, mu=0.95)
        buffer, q = step.buffer, step.q
        assert torch.allclose(step.p.T @ step.p, torch.eye(4, dtype=torch.float64), atol=1e-10)
    # converged power iteration: all singular values of P Q^T equal 1 (the orthonormalised update,
    # i.e. U V^T of the gradient's SVD, what Muon approximates with Newton-Schulz)
    s = torch.linalg.svdvals(step.p @ step.q.T)
    assert torch.allclose(s, torch.ones(4, dtype=torch.float64), atol=1e-6)
    svd = torch.linalg.svd(grad, full_matrices=False)
    assert torch.allclose((step.p @ step.q.T).abs(), (svd.U @ svd.Vh).abs(), atol=1e-6)
    first = torch.linalg.svdvals(
        zoo.dion_power_step(torch.zeros_like(grad), grad, torch.randn(4, 4, dtype=torch.float64), 0.95).p
    )
    assert torch.allclose(first, torch.ones(4, dtype=torch.float64))  # P itself is orthonormal from step one


def test_dion_low_rank_error_feedback_serves_every_direction_in_turn():
    grad = _matrix_with_spectrum(9, 4, [8.0, 4.0, 2.0, 1.0])
    u = torch.linalg.svd(grad).U  # [9, 9]
    q = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    buffer = torch.zeros_like(grad)
    overlap = []  # per step: |u_3^T P|, |u_4^T P| (third and fourth singular directions)
    for _ in range(200):
        step = zoo.dion_power_step(buffer, grad, q, mu=0.95)
        buffer, q = step.buffer, step.q
        assert torch.allclose(step.p.T @ step.p, torch.eye(2, dtype=torch.float64), atol=1e-10)
        assert torch.linalg.matrix_rank(step.p @ step.q.T) == 2
        overlap.append([float((u[:, k] @ step.p).norm()) for k in (2, 3)])
    overlap = torch.tensor(overlap)
    # rank 2 first serves the top two directions; the error buffer keeps what was not applied, and
    # since only served directions decay (by mu), the third and fourth get their turn later
    assert overlap[5:30].max() < 0.05
    assert overlap[:, 0].max() > 0.9 and overlap[:, 1].max() > 0.9


def test_dion_optimizer_applies_scaled_update_and_respects_conv1d_orientation():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=g)  # nn.Linear layout [out=6, in=4]
    grad = torch.randn(6, 4, generator=g)
    linear = nn.Parameter(weight.clone())
    conv1d = nn.Parameter(weight.T.clone())  # Conv1D layout [in=4, out=6]
    opt_linear = zoo.Dion([linear], lr=0.1, weight_decay=0.5)
    opt_conv = zoo.Dion([conv1d], lr=0.1, weight_decay=0.5, transposed=True)
    linear.grad, conv1d.grad = grad.clone(), grad.T.clone()
    torch.manual_seed(3)  # the warm start Q is drawn on the first step
    opt_linear.step()
    torch.manual_seed(3)
    opt_conv.step()
    torch.manual_seed(3)
    q0 = torch.randn(4, 4)
    q0 = q0 / q0.norm(dim=0, keepdim=True)
    expected_step = zoo.dion_power_step(torch.zeros(6, 4), grad, q0, mu=0.95)
    expected = weight * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(6 / 4) * expected_step.p @ expected_step.q.T
    assert torch.allclose(linear.detach(), expected, atol=1e-5)
    assert torch.allclose(conv1d.detach(), expected.T, atol=1e-5)
    with pytest.raises(ValueError, match="2-D"):
        zoo.Dion([nn.Parameter(torch.zeros(3))])


# --------------------------------------------------------------------------- MLP-Mixer and images


def test_mixer_activations_are_set_per_ffn():
    model = zoo.build_model("mixer-relu-gelu")
    for block in model.blocks:
        assert isinstance(block.mlp_tokens.act, nn.ReLU)  # FFN1, token mixing
        assert isinstance(block.mlp_channels.act, nn.GELU)  # FFN2, channel mixing
    model = zoo.build_model("mixer-gelu-relu")
    assert isinstance(model.blocks[0].mlp_tokens.act, nn.GELU)
    assert isinstance(model.blocks[0].mlp_channels.act, nn.ReLU)


def test_digits_dataset_is_real_deterministic_and_standardised():
    data = zoo.load_image_dataset("digits", image_size=16, channels=3, val_fraction=0.2, seed=0)
    assert (len(data.train), len(data.val), data.num_classes) == (1438, 359, 10)
    item = data.train[0]
    assert item["pixel_values"].shape == (3, 16, 16) and 0 <= item["labels"] < 10
    again = zoo.load_image_dataset("digits", image_size=16, seed=0)
    assert torch.equal(again.val.labels, data.val.labels)
    other = zoo.load_image_dataset("digits", image_size=16, seed=1)
    assert not torch.equal(other.val.labels, data.val.labels)
    x, y = data.train.batch(torch.arange(len(data.train)))
    assert torch.equal(x[:, 0], x[:, 2])  # grayscale replicated
    assert abs(float(x.mean())) < 0.05
    assert set(y.tolist()) == set(range(10))
    model = zoo.build_model("mixer-gelu-gelu")
    assert model(x[:4]).shape == (4, 10)


def test_cifar100_reads_a_local_pickle_directory(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(n))}
        with open(root / split, "wb") as handle:
            pickle.dump(batch, handle)
    data = zoo.load_image_dataset("cifar100", image_size=8, data_dir=str(tmp_path))
    assert (len(data.train), len(data.val), data.num_classes) == (6, 3, 100)
    assert data.train[5]["labels"] == 5 and data.train[0]["pixel_values"].shape == (3, 8, 8)
    assert data.source == str(root)


# --------------------------------------------------------------------------- paper sizes on meta

PAPER_COUNTS = [
    # (variant, size, nominal parameter count in the paper, relative tolerance)
    ("gpt2-gelu", "paper", 125e6, 0.01),
    ("gpt2-gelu", "160m", 160e6, 0.03),
    ("gpt2-gelu", "350m", 350e6, 0.03),
    ("llama-rope", "71m", 71e6, 0.01),
    ("llama-rope", "130m", 130e6, 0.04),
    ("llama-rope", "250m", 250e6, 0.02),
    ("llama-rope", "350m", 350e6, 0.06),  # GaLore/Mix-LN "350M" shape is 368M
    ("llama-nope", "1.3b", 1.3e9, 0.04),
    ("mixer-gelu-gelu", "paper", 59e6, 0.01),  # Mixer-B/16, 100 CIFAR classes
]


@pytest.mark.parametrize("name, size, nominal, tolerance", PAPER_COUNTS)
def test_paper_sizes_match_the_paper_parameter_counts_on_meta(name, size, nominal, tolerance):
    extra = {"num_classes": 100} if name.startswith("mixer") else {}
    with torch.device("meta"):
        model = zoo.build_model(name, size=size, **extra)
    assert next(model.parameters()).is_meta
    assert zoo.count_parameters(model) == pytest.approx(nominal, rel=tolerance)


def test_gpt2_paper_size_is_exactly_hf_gpt2_small():
    with torch.device("meta"):
        model = zoo.build_model("gpt2-gelu", size="paper")
    assert zoo.count_parameters(model) == 124_439_808


@pytest.mark.parametrize("name", list(zoo.VARIANTS))
def test_every_variant_builds_at_paper_size_on_meta(name):
    with torch.device("meta"):
        model = zoo.build_model(name, size="paper")
    assert zoo.count_parameters(model) > 50e6
