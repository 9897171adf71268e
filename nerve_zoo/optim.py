"""Optimizers of the NerVE runs: AdamW, Muon, Dion (+ SGD and Adam for the MLP-Mixer).

``build_optimizer(name, model, lr, weight_decay)`` returns one ``torch.optim.Optimizer``:

- ``adamw`` / ``adam`` / ``sgd``: one optimizer, weight decay on >= 2-D tensors only (not on biases,
  norm gains or the learnable LeakyReLU slope).
- ``muon``: ``torch.optim.Muon`` on the hidden weight matrices, ``ExpertMuon`` (the same update per expert)
  on stacks of expert matrices, AdamW on the rest;
- ``dion``: ``nerve_zoo.dion.Dion`` on the hidden weight matrices, AdamW on the rest (expert stacks included).

"Hidden weight matrix" (``split_parameters``): a 2-D parameter with both sides > 1 that does not belong
to an ``nn.Embedding`` (wte, wpe, embed_tokens) or the output head (``get_output_embeddings()`` of a
transformers model, ``get_classifier()`` of a timm model). Weight-norm gains (``[1, out]``) are thus
not matrices. GPT-2's ``Conv1D`` weights are stored ``[in, out]``; they are marked ``transposed`` so that
Dion's shape scaling uses fan_out / fan_in, and Muon runs with ``adjust_lr_fn="match_rms_adamw"``
(``0.2 * sqrt(max(m, n))``, Liu et al. 2025), which is symmetric in the two sides and lets Muon share
AdamW's learning rate and weight decay. "Expert stack" (``split_parameters``): a 3-D parameter with every
side > 1, transformers' fused routed experts (``gate_up_proj [E, 2F, d]``, ``down_proj [E, d, F]``): E
matrices stored ``[out, in]``.

Two optimizers are combined in ``CombinedOptimizer``, a real ``torch.optim.Optimizer`` whose
``param_groups`` are the inner optimizers' own group dicts. LR schedulers (``get_scheduler``,
``LambdaLR``) and ``transformers.Trainer(optimizers=(opt, sched))`` write ``group["lr"]`` and thereby
drive both inner optimizers; ``step``/``zero_grad``/``state_dict``/``load_state_dict`` cover both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.optim import Optimizer

from .dion import Dion


@dataclass
class ParamSplit:
    matrices: list[nn.Parameter] = field(default_factory=list)  # hidden 2-D weights, stored [out, in]
    matrices_transposed: list[nn.Parameter] = field(default_factory=list)  # hidden 2-D weights stored [in, out]
    decay: list[nn.Parameter] = field(default_factory=list)  # other >= 2-D tensors (embeddings, head, conv stem)
    no_decay: list[nn.Parameter] = field(default_factory=list)  # biases, norm gains, scalars
    expert_stacks: list[nn.Parameter] = field(default_factory=list)  # fused experts [E, out, in]: E matrices


def _transposed_module_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D  # weight [in, out]

    return (Conv1D,)


def _output_head(model: nn.Module) -> nn.Module | None:
    for getter in ("get_output_embeddings", "get_classifier"):
        if callable(getattr(model, getter, None)):
            head = getattr(model, getter)()
            if isinstance(head, nn.Module):
                return head
    return None


def split_parameters(model: nn.Module) -> ParamSplit:
    """Sort the trainable parameters of ``model`` into hidden matrices and the rest (see module docstring)."""
    excluded = {id(p) for module in model.modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    head = _output_head(model)
    if head is not None:
        excluded |= {id(p) for p in head.parameters()}
    transposed = {
        id(p)
        for module in model.modules()
        if isinstance(module, _transposed_module_types())
        for p in module.parameters()
    }
    split = ParamSplit()
    for param in model.parameters():  # shared (tied) tensors appear once
        if not param.requires_grad:
            continue
        non_trivial_axes = sum(size > 1 for size in param.shape)  # 1 for biases, gains, [1, out] weight-norm g
        if param.ndim == 2 and non_trivial_axes == 2 and id(param) not in excluded:
            (split.matrices_transposed if id(param) in transposed else split.matrices).append(param)
        elif param.ndim == 3 and non_trivial_axes == 3:
            split.expert_stacks.append(param)
        else:
            (split.decay if non_trivial_axes >= 2 else split.no_decay).append(param)
    return split


class ExpertMuon(Optimizer):
    """``torch.optim.Muon``'s update applied to each matrix of 3-D expert stacks ``[E, out, in]``: torch's own
    functional Muon step runs on the experts' views (``stack[e]``, its gradient and its slice of the stack's
    momentum buffer), so expert ``e`` moves exactly as ``torch.optim.Muon`` moves a 2-D parameter holding
    ``stack[e]``."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ):
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 3:
                    raise ValueError(f"ExpertMuon takes 3-D expert stacks [E, out, in], got shape {list(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim._muon import muon

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []  # one [out, in] view per expert of every stack
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                params += param.unbind(0)
                grads += param.grad.unbind(0)
                buffers += state["momentum_buffer"].unbind(0)
            options = ("weight_decay", "momentum", "nesterov", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn")
            muon(params, grads, buffers, lr=group["lr"], has_complex=False, **{k: group[k] for k in options})
        return loss


def _decay_groups(params_decay, params_no_decay, weight_decay: float) -> list[dict]:
    groups = [{"params": params_decay, "weight_decay": weight_decay}, {"params": params_no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


class CombinedOptimizer(Optimizer):
    """Steps several optimizers as one; ``param_groups`` are the inner optimizers' group dicts (shared)."""

    def __init__(self, optimizers: list[Optimizer]):
        self.optimizers = list(optimizers)
        # Optimizer.__init__ registers the very same dicts (add_param_group mutates, never copies them),
        # so a scheduler writing group["lr"] here writes it in the inner optimizer too.
        super().__init__([group for optimizer in self.optimizers for group in optimizer.param_groups], defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        inner = state_dict["optimizers"]
        if len(inner) != len(self.optimizers):
            raise ValueError(f"state dict holds {len(inner)} optimizers, this one has {len(self.optimizers)}")
        for optimizer, optimizer_state in zip(self.optimizers, inner):
            optimizer.load_state_dict(optimizer_state)
        # load_state_dict replaces the inner group dicts: share the new ones again
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(o).__name__ for o in self.optimizers)})"


def _adamw(split: ParamSplit, lr: float, weight_decay: float, **kwargs: Any) -> Optimizer:
    decay = split.matrices + split.matrices_transposed + split.expert_stacks + split.decay
    return torch.optim.AdamW(_decay_groups(decay, split.no_decay, weight_decay), lr=lr, **kwargs)


def _adam(split: ParamSplit, lr: float, weight_decay: float, **kwargs: Any) -> Optimizer:
    decay = split.matrices + split.matrices_transposed + split.expert_stacks + split.decay
    return torch.optim.Adam(_decay_groups(decay, split.no_decay, weight_decay), lr=lr, **kwargs)


def _sgd(split: ParamSplit, lr: float, weight_decay: float, momentum: float = 0.9, **kwargs: Any) -> Optimizer:
    decay = split.matrices + split.matrices_transposed + split.expert_stacks + split.decay
    return torch.optim.SGD(_decay_groups(decay, split.no_decay, weight_decay), lr=lr, momentum=momentum, **kwargs)


def _rest_adamw(
    split: ParamSplit, lr: float, weight_decay: float, adamw_kwargs: dict | None, stacks: bool = True
) -> Optimizer:
    """AdamW on everything but the hidden matrices (and the expert stacks when ``stacks`` is False)."""
    decay = split.decay + (split.expert_stacks if stacks else [])
    return torch.optim.AdamW(_decay_groups(decay, split.no_decay, weight_decay), lr=lr, **(adamw_kwargs or {}))


def _muon(
    split: ParamSplit,
    lr: float,
    weight_decay: float,
    matrix_lr: float | None = None,
    momentum: float = 0.95,
    adjust_lr_fn: str = "match_rms_adamw",
    adamw_kwargs: dict | None = None,
    **muon_kwargs: Any,
) -> Optimizer:
    matrices = split.matrices + split.matrices_transposed
    options = dict(
        lr=lr if matrix_lr is None else matrix_lr,
        weight_decay=weight_decay,
        momentum=momentum,
        adjust_lr_fn=adjust_lr_fn,
        **muon_kwargs,
    )
    muons = [torch.optim.Muon(matrices, **options)] if matrices else []
    if split.expert_stacks:
        muons.append(ExpertMuon(split.expert_stacks, **options))
    return CombinedOptimizer([*muons, _rest_adamw(split, lr, weight_decay, adamw_kwargs, stacks=False)])


def _dion(
    split: ParamSplit,
    lr: float,
    weight_decay: float,
    matrix_lr: float | None = None,
    mu: float = 0.95,
    rank_fraction: float = 1.0,
    adamw_kwargs: dict | None = None,
) -> Optimizer:
    groups = [
        {"params": split.matrices, "transposed": False},
        {"params": split.matrices_transposed, "transposed": True},
    ]
    dion = Dion(
        [group for group in groups if group["params"]],
        lr=lr if matrix_lr is None else matrix_lr,
        mu=mu,
        rank_fraction=rank_fraction,
        weight_decay=weight_decay,
    )
    return CombinedOptimizer([dion, _rest_adamw(split, lr, weight_decay, adamw_kwargs)])


# optimizer name -> factory(split, lr, weight_decay, **options)
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
    "muon": _muon,
    "dion": _dion,
}


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float = 0.0, **options: Any) -> Optimizer:
    """Build optimizer ``name`` for ``model``; ``options`` go to the factory.

    adamw/adam: torch kwargs (betas, eps). sgd: momentum (0.9) and torch kwargs. muon: matrix_lr (None =
    lr), momentum (0.95), adjust_lr_fn ("match_rms_adamw"), adamw_kwargs, other ``torch.optim.Muon``
    kwargs. dion: matrix_lr (None = lr), mu (0.95), rank_fraction (1.0), adamw_kwargs.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](split_parameters(model), lr, weight_decay, **options)
