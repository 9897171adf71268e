"""What measuring routed experts costs: one MoE layer, measured forward against unmeasured, and its state.

Two layer shapes, each transformers' own sparse MoE block (router + fused experts module) built from a config,
in a one-block model whose only site is the routed experts (the tracker's ``experts`` stage):

* ``mixtral``: ``MixtralSparseMoeBlock``, E = 8 experts of F = 1024, top-2;
* ``qwen3_moe``: ``Qwen3MoeSparseMoeBlock``, E = 64 experts of F = 768, top-8 (``--qwen-experts 128``: E = 128).

The model width D (512 by default, ``--hidden``) is smaller than the real models' (4096, 2048) to keep the run
at a few minutes on one core; the expert state and the eigendecompositions depend on F and E only, the
recompute of the measured experts' gate/up projections scales with D like the forward itself.

Per shape and per variant (``all``: every expert; ``per_step``: the expert round-robin, ``experts_per_step`` =
E / 4 for Mixtral, 8 for Qwen3-MoE), medians over repeats of the process's CPU time (``time.process_time``):

* ``plain_forward_s``: the layer without a tracker; ``measured_forward_s``: with the tracker's hooks recording
  (the recompute of every measured expert's pre/post and its covariance update); ``forward_ratio``;
* ``compute_s``: one ``compute()`` (2 eigendecompositions of F x F per measured expert, routing statistics);
* ``state_bytes``: the float64 state the tracker holds after a measured forward (read from its accumulators),
  ``formula_bytes`` = 2 x (F^2 + F) x 8 x (measured experts), and the tracker's own budget figure
  ``budget_bytes`` (what ``memory_budget_mb`` is checked against: the formula plus the routing counts).

Run: ``python benchmarks/perf/moe_overhead.py --device cpu --threads 1 [--quick]`` (about 3 minutes on one
core; ``--quick``: 256 tokens, one repeat, under a minute). Writes
``benchmarks/results/perf/moe_overhead_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import add_common_args, apply_threads, devices, synchronize, write_result
from torch import nn

from model_adapters import Adapter, ExpertsSpec, FFNSite
from nerve_hf import FFNTracker

# name -> (config class name, config keywords for E, F, top-k); D and the round-robin share are added below.
SHAPES = {
    "mixtral": ("MixtralConfig", "MixtralSparseMoeBlock", "num_local_experts", 8, 1024, 2),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeSparseMoeBlock", "num_experts", 64, 768, 8),
}
ADAPTER = Adapter(
    sites=(FFNSite("experts", "layers", "mlp.experts", "mlp.experts", kind="expert", experts=ExpertsSpec()),),
    gated=True,
)


class OneLayer(nn.Module):
    """One block holding transformers' sparse MoE block at ``layers.0.mlp``: ``x [B, T, D] -> [B, T, D]``."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].mlp = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers[0].mlp(x)
        return out[0] if isinstance(out, tuple) else out  # some blocks also return router logits


def build(shape: str, experts: int, hidden: int, device: torch.device) -> tuple[nn.Module, int, int, int]:
    """The one-layer model of ``shape`` with ``experts`` experts: (model, E, F, top-k)."""
    import transformers

    config_name, block_name, experts_key, _, width, top_k = SHAPES[shape]
    module = transformers.models.mixtral.modeling_mixtral if shape == "mixtral" else None
    if module is None:
        module = transformers.models.qwen3_moe.modeling_qwen3_moe
    config = getattr(transformers, config_name)(
        hidden_size=hidden,
        intermediate_size=width,
        moe_intermediate_size=width,
        num_experts_per_tok=top_k,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        **{experts_key: experts},
    )
    config._experts_implementation = "eager"  # what a model built from this config would dispatch to
    torch.manual_seed(0)
    moe = getattr(module, block_name)(config)
    with torch.no_grad():
        for param in moe.parameters():  # transformers leaves fused expert weights to _init_weights
            param.normal_(0, hidden**-0.5)
    return OneLayer(moe).to(device).eval(), experts, width, top_k


def _timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.process_time() if device.type == "cpu" else time.perf_counter()
    fn()
    synchronize(device)
    return (time.process_time() if device.type == "cpu" else time.perf_counter()) - start


def _state_bytes(tracker: FFNTracker) -> int:
    """Bytes of float64 state the tracker's expert accumulators hold now (the means and second moments
    allocated at an expert's first rows and freed by a reset)."""
    experts = tracker.window().measurements.get("experts")
    total = 0
    for pair in experts._pairs.values():
        for acc in pair:
            tensors = [acc._m2, *(acc._means or ())]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def run_variant(model, x, device, repeats: int, per_step: int | None, n_experts: int, width: int) -> dict:
    options = {"experts_per_step": per_step} if per_step else {}
    tracker = FFNTracker(model, adapter=ADAPTER, flow=False, **options)
    plain, measured, compute = [], [], []
    with torch.no_grad():
        model(x)  # warm-up
        for _ in range(repeats):  # interleaved, so drifts of a shared machine hit both alike
            plain.append(_timed(lambda: model(x), device))
            tracker.reset()
            with tracker:
                measured.append(_timed(lambda: model(x), device))
            compute.append(_timed(lambda: tracker.compute(), device))
    share = min(per_step or n_experts, n_experts)
    budget = tracker.window().measurements.get("experts").state_bytes([0])
    return {
        "experts_per_step": per_step,
        "measured_experts": share,
        "plain_forward_s": statistics.median(plain),
        "measured_forward_s": statistics.median(measured),
        "forward_ratio": statistics.median(measured) / statistics.median(plain),
        "compute_s": statistics.median(compute),
        "state_bytes": _state_bytes(tracker),
        "formula_bytes": 2 * (width**2 + width) * 8 * share,
        "budget_bytes": budget,
    }


def markdown(results: list[dict], env: dict, tokens: int, hidden: int) -> str:
    lines = [
        "# Routed experts: measured forward vs plain, and the expert state",
        "",
        f"One MoE layer (transformers' own sparse MoE block), D = {hidden}, {tokens} tokens per forward, "
        f"{env['device']} ({env['cpu']}, {env['cpu_threads']} thread(s)), CPU time medians. "
        "`benchmarks/perf/moe_overhead.py`; the state is read from the tracker's accumulators after a measured "
        "forward, the formula is 2 x (F^2 + F) x 8 bytes per measured expert.",
        "",
        "| layer | E | F | top-k | experts_per_step | plain fwd (s) | measured fwd (s) | ratio | compute (s) "
        "| state (MiB) | formula (MiB) | budget (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['shape']} | {r['experts']} | {r['width']} | {r['top_k']} | {r['experts_per_step'] or 'all'} "
            f"| {r['plain_forward_s']:.4f} | {r['measured_forward_s']:.4f} | {r['forward_ratio']:.2f} "
            f"| {r['compute_s']:.3f} | {r['state_bytes'] / 2**20:.2f} | {r['formula_bytes'] / 2**20:.2f} "
            f"| {r['budget_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--tokens", type=int, default=None, help="tokens per forward (default 2048; --quick 256)")
    parser.add_argument("--hidden", type=int, default=512, help="model width D of the layers (default 512)")
    parser.add_argument("--qwen-experts", type=int, default=64, help="E of the Qwen3-MoE-shaped layer (64 or 128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; --quick 1)")
    parser.add_argument("--shapes", default="mixtral,qwen3_moe", help="comma list of layer shapes: " + ",".join(SHAPES))
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    tokens = args.tokens or (256 if args.quick else 2048)
    repeats = args.repeats or (1 if args.quick else 3)
    for device in devices(args.device):
        results = []
        for shape in args.shapes.split(","):
            n_experts = args.qwen_experts if shape == "qwen3_moe" else SHAPES[shape][3]
            model, n_experts, width, top_k = build(shape, n_experts, args.hidden, device)
            torch.manual_seed(1)
            x = torch.randn(1, tokens, args.hidden, device=device)
            share = n_experts // 4 if shape == "mixtral" else 8
            for per_step in (None, share):
                row = run_variant(model, x, device, repeats, per_step, n_experts, width)
                row.update(shape=shape, experts=n_experts, width=width, top_k=top_k, hidden=args.hidden, tokens=tokens)
                results.append(row)
                print(
                    f"{shape:10s} E={n_experts:3d} F={width} per_step={per_step or 'all':>3} "
                    f"plain {row['plain_forward_s']:.4f}s measured {row['measured_forward_s']:.4f}s "
                    f"(x{row['forward_ratio']:.2f}) compute {row['compute_s']:.3f}s "
                    f"state {row['state_bytes'] / 2**20:.2f} MiB (formula {row['formula_bytes'] / 2**20:.2f})",
                    flush=True,
                )
        path = write_result(args.out, "moe_overhead", device, {"tokens": tokens, "results": results}, args.quick)
        from _common import environment

        path.with_suffix(".md").write_text(markdown(results, environment(device), tokens, args.hidden))


if __name__ == "__main__":
    main()
