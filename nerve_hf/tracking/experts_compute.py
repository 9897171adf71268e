"""Recompute each routed expert's pre and post from the fused experts module's own inputs and parameters.

transformers runs routed experts inside one module (``gate_up_proj [E, 2F, D]`` or ``[E, D, 2F]``,
``down_proj``) through an experts implementation (``eager``, ``batched_mm``, ``grouped_mm``, ...): no
per-expert module exists to hook. A forward pre-hook on that module reads its call, and this module
recomputes, for the real (token, expert) assignments only, what every expert computes:

* pre = the expert's gate projection output (its up projection for up-only experts), bias included
  (gpt-oss: the gate columns with bias, before the clamp);
* post = the down projection's input, before router weighting: the module's own ``_apply_gate`` on the
  gate/up output (so gpt-oss's clamped SwiGLU is its own), or its ``act_fn`` (or the activation the
  spec names) for up-only experts. An expert whose FFN applies dropout between its activation and its
  down projection (Switch Transformers' ``expert_{e}``) is recomputed without it: the same values in
  evaluation, the activation before dropout in a training window (a dense FFN's post, read at its down
  projection's input, is after its dropout).

Other layouts are named by the spec: separate gate and up weights (DBRX), experts stacked ``[E*F, D]``,
one ``nn.Linear`` per expert (Switch Transformers); and other routings: Llama 4's scaled rows, JetMoe's
rows grouped by expert, Switch's one-hot choice with capacity drops (:func:`read_call`).

Whatever implementation the model uses, the inputs and parameters are the same, so the numbers are too.
Cost: one more gate/up projection over the measured assignments, only on measured forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from model_adapters import ExpertsSpec

__all__ = ["ExpertCall", "ExpertRows", "ExpertsLayout", "expert_rows", "read_call"]


def _get(module: nn.Module, path: str):
    """The attribute at dotted ``path`` below ``module`` (submodules, ``ModuleDict`` keys, parameters)."""
    target = module
    for part in path.split("."):
        target = getattr(target, part)
    return target


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its weights (the spec's fields, else the module's attributes).

    ``gate_up``/``up``/``act`` are paths inside the module (``{}``: the expert's index); ``gate_up`` empty:
    the module's ``gate_up_proj`` (gated) or ``up_proj``."""

    gated: bool
    transposed: bool
    concatenated: bool
    bias: bool
    gate_up: str = ""
    up: str = ""
    act: str = ""

    @classmethod
    def of(cls, module: nn.Module, spec: ExpertsSpec) -> "ExpertsLayout":
        def pick(value, attribute, default):
            return value if value is not None else bool(getattr(module, attribute, default))

        layout = cls(
            gated=pick(spec.gated, "has_gate", True),
            transposed=pick(spec.transposed, "is_transposed", False),
            concatenated=pick(spec.concatenated, "is_concatenated", True),
            bias=pick(spec.bias, "has_bias", False),
            gate_up=spec.gate_up or ("gate_up_proj" if pick(spec.gated, "has_gate", True) else "up_proj"),
            up=spec.up,
            act=spec.act,
        )
        layout.check_readable(module)
        return layout

    def check_readable(self, module: nn.Module) -> None:
        """ValueError when the experts' weights cannot be read as the values the model computes with:
        quantized (float8 or integer data, a quantized tensor subclass, or scales next to them on the module
        that holds them: transformers' ``FP8Experts``, fbgemm's FP8 experts ...), or offloaded (on ``meta``
        until accelerate loads them inside the forward, after the hook that reads the call). Refused by
        their class, dtype or device."""
        for path in filter(None, (self.gate_up, self.up)):
            target = _get(module, path.format(0))  # the fused parameter, or expert 0's own module
            weight = target.weight if isinstance(target, nn.Module) else target
            holder = (
                target
                if isinstance(target, nn.Module)
                else _get(module, path.rsplit(".", 1)[0])
                if "." in path
                else module
            )
            self._check_weight(module, holder, weight)

    @staticmethod
    def _check_weight(module: nn.Module, holder: nn.Module, weight: Tensor) -> None:
        plain = type(weight) in (Tensor, nn.Parameter)
        real = weight.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        owners = {id(m): m for m in (module, holder)}.values()
        scales = sorted(
            {name for m in owners for name, _ in (*m.named_parameters(recurse=False), *m.named_buffers(recurse=False))
             if "scale" in name}
        )  # fmt: skip
        if weight.device.type == "meta":
            raise ValueError(
                f"the fused experts module {type(module).__name__} has its weights offloaded (on meta until the "
                f"forward loads them): its routed experts cannot be recomputed; keep the MoE layers resident "
                f"(a device map without disk offload for them), or pass layers= without its MoE layers"
            )
        if plain and real and not scales:
            return
        kind = type(weight).__name__ if not plain else str(weight.dtype).replace("torch.", "")
        raise ValueError(
            f"the fused experts module {type(module).__name__} holds quantized weights ({kind}"
            f"{', with ' + ', '.join(scales) if scales else ''}): its routed experts cannot be recomputed from "
            f"them; load the model unquantized (or with its experts unquantized), or pass layers= without its "
            f"MoE layers"
        )

    def count(self, module: nn.Module) -> int:
        """E: the experts' count (a 3-D weight's first dimension, else the module's ``num_experts``)."""
        if "{}" in self.gate_up:
            return int(module.num_experts)
        weight = _get(module, self.gate_up)
        return int(weight.shape[0]) if weight.ndim == 3 else int(module.num_experts)

    def _weight(self, module: nn.Module, path: str, expert: int) -> tuple[Tensor, Optional[Tensor]]:
        """(weight ``[out, in]`` (``[in, out]`` transposed), bias or None) of ``expert`` at ``path``."""
        target = _get(module, path.format(expert))
        if isinstance(target, nn.Linear):  # one module per expert
            return target.weight, target.bias
        if target.ndim == 2:  # the experts stacked along the first dimension: [E*out, in]
            return target.view(self.count(module), -1, target.shape[-1])[expert], None
        return target[expert], None

    def sizes(self, module: nn.Module) -> tuple[int, int]:
        """(E, F): the number of experts and each expert's width."""
        weight, _ = self._weight(module, self.gate_up, 0)
        width = weight.shape[1] if self.transposed else weight.shape[0]
        return self.count(module), int(width // 2 if self.gated and not self.up else width)

    def _project(self, module: nn.Module, path: str, expert: int, x: Tensor) -> Tensor:
        weight, bias = self._weight(module, path, expert)
        x = x.to(weight.device)  # a device-mapped layer: its inputs are moved to its weights inside the forward
        out = x @ weight if self.transposed else nn.functional.linear(x, weight)  # [n, out]
        return out if bias is None else out + bias

    def _act(self, module: nn.Module, expert: int):
        return _get(module, self.act.format(expert)) if self.act else module.act_fn

    def project(self, module: nn.Module, expert: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """(pre, post), each ``[n, F]``, of ``expert`` on its inputs ``x`` ``[n, D]``, in ``x``'s dtype."""
        out = self._project(module, self.gate_up, expert, x)  # [n, 2F] or [n, F]
        if self.bias:
            out = out + (module.gate_up_proj_bias if self.gated else module.up_proj_bias)[expert]
        if not self.gated:
            return out, self._act(module, expert)(out)
        if self.up:  # gate and up in two weights
            return out, self._act(module, expert)(out) * self._project(module, self.up, expert, x)
        width = out.shape[-1] // 2
        gate = out[..., :width] if self.concatenated else out[..., ::2]
        if hasattr(module, "_apply_gate") and not self.act:
            return gate, module._apply_gate(out)
        up = out[..., width:] if self.concatenated else out[..., 1::2]
        return gate, self._act(module, expert)(gate) * up


@dataclass
class ExpertCall:
    """One call of an experts module, as routed.

    Attributes:
        inputs: ``[N, D]`` token rows (routing ``"call"``), or ``[E, N, D]`` per-expert rows (``"scaled"``).
        top_k_index: ``[N, k]`` expert of each (token, slot); ids ``>= E`` (expert-parallel sentinels) skipped.
        top_k_weights: ``[N, k]`` router weight of each (token, slot).
    """

    inputs: Tensor
    top_k_index: Tensor
    top_k_weights: Tensor

    @property
    def tokens(self) -> int:
        return int(self.top_k_index.shape[0])


def _argument(args: tuple, kwargs: dict, position: int, names: tuple[str, ...]) -> Optional[Tensor]:
    if len(args) > position:
        return args[position]
    return next((kwargs[name] for name in names if name in kwargs), None)


def read_call(
    spec: ExpertsSpec, args: tuple, kwargs: dict, router: Optional[nn.Module], router_output
) -> Optional[ExpertCall]:
    """The routed call of an experts module from its forward's ``args``/``kwargs`` (and, for ``"scaled"``
    and ``"grouped"`` routing, the router module and its last output); None if unreadable."""
    hidden = _argument(args, kwargs, 0, ("hidden_states",))
    if not isinstance(hidden, Tensor):
        return None
    if spec.routing == "scaled":  # router output: (scores [N, E], logits [N, E])
        if router_output is None:
            return None
        scores, logits = router_output[0], router_output[1]
        index = torch.topk(logits, router.top_k, dim=1).indices  # the router's own choice: [N, k]
        experts = scores.shape[1]
        return ExpertCall(hidden.reshape(experts, -1, hidden.shape[-1]), index, scores.gather(1, index))
    if spec.routing == "grouped":
        return None if router_output is None else _grouped_call(hidden, router, router_output)
    index = _argument(args, kwargs, 1, ("top_k_index", "router_indices", "selected_experts", "router_mask"))
    weights = _argument(args, kwargs, 2, ("top_k_weights", "routing_weights", "router_probs"))
    if not isinstance(index, Tensor) or not isinstance(weights, Tensor):
        return None
    if spec.routing == "one_hot":  # selected [N, k, E] one-hot, all zeros where a slot was dropped
        experts = index.shape[-1]
        index = torch.where(index.sum(-1) > 0, index.argmax(-1), experts)  # [N, k]; E: no expert (skipped)
    return ExpertCall(hidden.reshape(-1, hidden.shape[-1]), index.reshape(-1, index.shape[-1]), weights)


def _grouped_call(rows: Tensor, router: nn.Module, output) -> ExpertCall:
    """JetMoe: ``rows`` ``[N*k, D]`` = the tokens grouped by expert, as the router's output
    ``(index_sorted_experts [N*k], batch_index [N*k], batch_gates [N*k], expert_size [E], logits [N, E])``
    orders them; back to token rows ``[N, D]``, top-k experts ``[N, k]`` and their weights ``[N, k]``."""
    order, token, gates, sizes, logits = output[:5]
    n, k = logits.shape[0], router.top_k
    expert = torch.repeat_interleave(  # [N*k]: the expert of each grouped row
        torch.arange(len(sizes), device=rows.device), torch.as_tensor(sizes, device=rows.device)
    )
    index = torch.empty(n * k, dtype=torch.long, device=rows.device)
    index[order] = expert  # row j of the group is slot order[j] of the flattened [N, k] choice
    weights = torch.empty(n * k, dtype=gates.dtype, device=rows.device)
    weights[order] = gates
    hidden = rows.new_empty(n, rows.shape[-1])
    hidden[token] = rows  # every copy of a token is the same row
    return ExpertCall(hidden, index.view(n, k), weights.view(n, k))


@dataclass
class ExpertRows:
    """The real (token, expert) assignments of one call, recomputed and grouped by expert.

    Attributes:
        pre, post: expert -> ``[n_e, F]`` rows, for the experts in ``wanted`` that received any.
        assignments: ``[E]`` float64, real assignments per expert (every expert, wanted or not).
        tokens: the number of real tokens.
        entropy: sum over real tokens of the entropy of their normalised top-k router weights.
    """

    pre: dict[int, Tensor]
    post: dict[int, Tensor]
    assignments: Tensor
    tokens: int
    entropy: float


def _entropy_sum(weights: Tensor) -> float:
    """Sum over rows of the entropy (nats) of each row of ``weights`` ``[n, k]``, normalised to 1."""
    p = weights.double()
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return float(-(p * p.clamp_min(1e-300).log()).sum())


def expert_rows(
    module: nn.Module, layout: ExpertsLayout, call: ExpertCall, real: Tensor, wanted: Optional[set[int]]
) -> ExpertRows:
    """Recompute the experts of ``call`` on its real tokens (``real`` ``[N]`` bool); ``wanted``: the experts
    whose pre/post to compute (None: all). Reads the expert counts on the host (one sync)."""
    n_experts, _ = layout.sizes(module)
    n_tokens, k = call.top_k_index.shape
    index = call.top_k_index.reshape(-1)  # [N*k]
    token = torch.arange(n_tokens, device=index.device).repeat_interleave(k)  # [N*k]
    valid = real.to(index.device)[token] & (index >= 0) & (index < n_experts)
    index, token = index[valid], token[valid]  # [S]
    assignments = torch.bincount(index, minlength=n_experts)  # [E]
    order = torch.argsort(index, stable=True)
    index, token = index[order], token[order]
    counts = assignments.tolist()  # the host sync
    pre, post = {}, {}
    start = 0
    for expert, count in enumerate(counts):
        stop = start + count
        if count and (wanted is None or expert in wanted):
            rows = token[start:stop]
            x = call.inputs[rows] if call.inputs.ndim == 2 else call.inputs[expert, rows]  # [n_e, D]
            pre[expert], post[expert] = layout.project(module, expert, x)
        start = stop
    n_real = int(real.sum())
    weights = call.top_k_weights.reshape(n_tokens, -1)[real.to(call.top_k_weights.device)]
    return ExpertRows(pre, post, assignments.double().cpu(), n_real, _entropy_sum(weights) if n_real else 0.0)
