"""benchmarks' ``moe`` experiment (issue 27, the experiment beyond the paper): the zoo's MoE LLaMA, Muon per
expert, and the per-expert series a smoke run stores, checked against this file's own hooks on the experts
module over the real eval tokens (float64 references), the routing counts against the router's own top-k.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reference import activation_metrics  # noqa: E402
from test_benchmarks import offline_cache_and_one_thread  # noqa: E402, F401  (autouse here too)


def test_llama_moe_has_the_dense_llamas_active_ffn_parameters():
    from _experiments import load_experiment

    import nerve_zoo as zoo

    experiment = load_experiment("moe")
    dense_run, moe_run = experiment.runs[0], experiment.runs[2]
    dense_settings, moe_settings = experiment.resolve(dense_run, "cpu"), experiment.resolve(moe_run, "cpu")
    with torch.device("meta"):
        dense = zoo.build_model(dense_settings.variant, size="cpu", vocab_size=2048, **dense_settings.model_overrides)
        moe = zoo.build_model(moe_settings.variant, size="cpu", vocab_size=2048, **moe_settings.model_overrides)
    d, big_d = dense.config.hidden_size, dense.config.intermediate_size
    assert (d, big_d, moe.config.hidden_size) == (64, 172, 64)
    experts = moe.model.layers[0].mlp.experts
    top_k = moe.config.num_experts_per_tok
    assert (experts.gate_up_proj.shape, experts.down_proj.shape, top_k) == ((8, 172, 64), (8, 64, 86), 2)
    mlp = dense.model.layers[0].mlp
    dense_ffn = sum(p.numel() for p in mlp.parameters())  # 3 d D
    active = top_k * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
    assert active == dense_ffn == 3 * 64 * 172
    same = ("num_hidden_layers", "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size")
    assert all(getattr(moe.config, k) == getattr(dense.config, k) for k in same)
    assert moe.config.rope_parameters["rope_theta"] == dense.config.rope_parameters["rope_theta"]


def test_expert_muon_moves_each_expert_as_torch_muon_moves_a_matrix():
    import nerve_zoo as zoo

    generator = torch.Generator().manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(3, 12, 7, generator=generator))
    singles = [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(3)]
    ours = zoo.ExpertMuon([stack], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    torch_muon = torch.optim.Muon(singles, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        grad = torch.randn(3, 12, 7, generator=generator)
        stack.grad = grad.clone()
        for e, single in enumerate(singles):
            single.grad = grad[e].clone()
        ours.step()
        torch_muon.step()
    for e, single in enumerate(singles):
        assert torch.equal(stack.detach()[e], single.detach())
    assert not torch.equal(stack.detach()[0], torch.zeros(12, 7))
    with pytest.raises(ValueError, match="3-D"):
        zoo.ExpertMuon([torch.nn.Parameter(torch.ones(4, 4))])


def test_muon_on_the_moe_model_orthogonalises_every_expert_stack():
    import nerve_zoo as zoo

    model = zoo.build_model("llama-moe", size="tiny")
    split = zoo.split_parameters(model)
    stacks = {id(p) for layer in model.model.layers for p in layer.mlp.experts.parameters()}
    assert {id(p) for p in split.expert_stacks} == stacks and len(stacks) == 2 * len(model.model.layers)
    optimizer = zoo.build_optimizer("muon", model, lr=1e-3, weight_decay=0.1)
    expert_muon = [o for o in optimizer.optimizers if isinstance(o, zoo.ExpertMuon)]
    assert len(expert_muon) == 1
    assert {id(p) for g in expert_muon[0].param_groups for p in g["params"]} == stacks
    adamw = zoo.build_optimizer("adamw", model, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for g in adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert stacks <= decayed


def _reference(model, loader):
    """Per layer: router assignments per expert [E] (the router's own top-k) and each expert's float64
    metrics from its (pre, post) rows recomputed here from the experts module's inputs and parameters."""
    layers = model.model.layers
    captured = {i: [] for i in range(len(layers))}
    handles = [
        layer.mlp.experts.register_forward_pre_hook(
            lambda module, args, i=i: captured[i].append((args[0].detach(), args[1].detach()))
        )
        for i, layer in enumerate(layers)
    ]
    model.eval()
    real = 0
    with torch.no_grad():
        for batch in loader:
            model(input_ids=batch["input_ids"])
            real += int(batch["input_ids"].numel())  # grouped LM blocks: every position is a real token
    for handle in handles:
        handle.remove()
    out = {}
    for i, layer in enumerate(layers):
        experts = layer.mlp.experts
        width = experts.intermediate_dim
        hidden = torch.cat([h for h, _ in captured[i]]).double()  # [N, d]
        index = torch.cat([k for _, k in captured[i]])  # [N, top_k]
        counts = torch.bincount(index.reshape(-1), minlength=experts.num_experts)  # [E]
        metrics = {}
        for e in range(experts.num_experts):
            rows = (index == e).any(dim=-1)  # [N]: tokens routed to e (top-k indices are distinct)
            if int(rows.sum()) < 2:
                continue
            gate_up = hidden[rows] @ experts.gate_up_proj[e].detach().double().T  # [n, 2F]
            gate, up = gate_up[:, :width], gate_up[:, width:]
            metrics[e] = activation_metrics(gate.numpy(), (torch.nn.functional.silu(gate) * up).numpy())
        out[i] = (counts.tolist(), metrics)
    return out, real


def test_smoke_moe_run_stores_expert_rows_whose_tokens_are_real_tokens_times_top_k():
    from _experiments import load_experiment
    from _experts import ROUTER_ENTROPY_KEY, expert_series, series_records
    from _stats import nerve_series
    from _train import build_run

    from nerve_hf.sinks.records import RECORDS_FILENAME, read_records

    experiment = load_experiment("moe")
    run = next(r for r in experiment.runs if r.name == "moe-adamw")
    settings = experiment.resolve(run, "smoke", {"max_steps": 2, "eval_every": 1})
    with tempfile.TemporaryDirectory() as output_dir:
        trainer, model, _ = build_run(settings, output_dir, progress=False)
        trainer.train()
        records = list(read_records(Path(output_dir) / RECORDS_FILENAME))
    experts = json.loads(json.dumps(expert_series(records, trainer.state.log_history)))
    top_k = model.config.num_experts_per_tok
    reference, real = _reference(model, trainer.get_eval_dataloader())
    assert experts["steps"] == [1, 2] and experts["layers"] == [0, 1] and experts["experts"] == 8
    assert real == settings.eval_samples * settings.block_size
    for step_tokens in experts["tokens"]:  # [L][E] per evaluation
        assert [sum(layer) for layer in step_tokens] == [real * top_k] * 2
    for li in range(2):  # the final evaluation ran with the trained weights, as the reference does
        counts, metrics = reference[li]
        assert experts["tokens"][-1][li] == counts
        assert metrics and set(metrics) == {e for e in range(8) if experts["per_expert"]["pr_pre"][-1][li][e]}
        for e, want in metrics.items():
            for name, value in want.items():
                assert experts["per_expert"][name][-1][li][e] == pytest.approx(value, rel=1e-4, abs=1e-6), (li, e, name)
    logs = {log["step"]: log for log in trainer.state.log_history if "eval_loss" in log}
    for s, step in enumerate(experts["steps"]):  # the library's routing statistics from the router's top-k
        for key in ("dead_fraction", "load_cv", "load_entropy"):
            ours = sum(experts["routing"][key][s]) / 2
            assert ours == pytest.approx(logs[step][f"eval_nerve/mean/experts/router/{key}"], rel=1e-9, abs=1e-12)
        assert experts["router_entropy"][s] == logs[step][ROUTER_ENTROPY_KEY]
    series = nerve_series(series_records(records))  # one assignment-weighted site per MoE layer
    assert series["sites"] == ["experts.0", "experts.1"]
    for metric in ("pr_pre", "pr_post", "se_pre"):
        for s, step in enumerate(series["steps"]):
            assert series["mean"]["all"][metric][s] == pytest.approx(
                logs[step][f"eval_nerve/mean/experts/{metric}_mean"], rel=1e-9
            )
            for li in range(2):
                values, weights = experts["per_expert"][metric][s][li], experts["tokens"][s][li]
                pairs = [(w, v) for w, v in zip(weights, values) if v is not None and w]
                want = math.fsum(w * v for w, v in pairs) / sum(w for w, _ in pairs)
                assert series["per_site"][metric][s][li] == pytest.approx(want, rel=1e-9)
    assert np.isfinite(experts["per_expert"]["pr_post"][-1][0][next(iter(reference[0][1]))])
