"""Dion: orthonormalised low-rank updates with error feedback, single-device form.

Ahn, Xu, Abreu, Langford et al., "Dion: Distributed Orthonormalized Updates", arXiv 2504.05295 (2025),
Algorithm 1 (centralised Dion). For a weight ``X in R^{m x n}`` (``y = X x``: m outputs, n inputs) with
gradient ``G``, momentum/error buffer ``M`` and right factor ``Q in R^{n x r}`` carried between steps::

    B = M + G                      # buffer plus new gradient             [m, n]
    P = orth(B Q)                  # one warm-started power-iteration step [m, r], P^T P = I
    R = B^T P                      #                                       [n, r]
    M = B - (1 - mu) P R^T         # error feedback: keep what the rank-r update did not use
    Q = column_normalise(R)        # next warm start                       [n, r]
    X = (1 - lr * wd) X - lr * sqrt(m / n) * P Q^T

``P R^T`` is the rank-r approximation of ``B``; the applied update ``P Q^T`` drops its singular values.
Its left factor is orthonormal every step; its right factor becomes orthonormal as the warm-started
power iteration converges (with a fixed gradient: plain orthogonal iteration), after which ``P Q^T``
has r singular values equal to 1: the orthonormalised update that Muon computes with Newton-Schulz.
``sqrt(m / n)`` is the paper's shape scaling (fan_out / fan_in); weight decay is decoupled.

No PyPI package provides Dion; this is our implementation from the paper (Microsoft's reference code
is ``github.com/microsoft/dion``). Only 2-D parameters are accepted; ``build_optimizer("dion", ...)``
sends embeddings, the LM head, norms and biases to AdamW.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim import Optimizer


@dataclass(frozen=True)
class DionStep:
    p: torch.Tensor  # [m, r] orthonormal columns
    r: torch.Tensor  # [n, r] B^T P
    q: torch.Tensor  # [n, r] column-normalised R, next warm start
    buffer: torch.Tensor  # [m, n] error-feedback momentum after the step


def dion_power_step(
    buffer: torch.Tensor, grad: torch.Tensor, q: torch.Tensor, mu: float, eps: float = 1e-8
) -> DionStep:
    """One Dion step on matrices in ``[m, n]`` (output, input) orientation; pure function, no update applied."""
    b = buffer + grad  # [m, n]
    p, _ = torch.linalg.qr(b @ q, mode="reduced")  # [m, r]
    r = b.T @ p  # [n, r]
    new_buffer = b - (1.0 - mu) * (p @ r.T)  # [m, n]
    q_next = r / (r.norm(dim=0, keepdim=True) + eps)  # [n, r]
    return DionStep(p=p, r=r, q=q_next, buffer=new_buffer)


def dion_rank(shape: torch.Size, rank_fraction: float) -> int:
    """Rank r of the update of an ``[m, n]`` matrix: ``ceil(rank_fraction * min(m, n))``, at least 1."""
    return max(1, min(min(shape), math.ceil(rank_fraction * min(shape))))


class Dion(Optimizer):
    """Dion for 2-D parameters (see module docstring).

    Args:
        params: 2-D tensors or param groups. A group with ``transposed=True`` holds weights stored
            ``[in, out]`` (GPT-2 ``Conv1D``); Dion then works on the transpose so that m = outputs.
        lr: learning rate (the update ``P Q^T`` has unit spectral norm before ``sqrt(m/n)``).
        mu: momentum decay of the error-feedback buffer.
        rank_fraction: r = ceil(rank_fraction * min(m, n)); 1.0 = full rank.
        weight_decay: decoupled, ``X <- (1 - lr * wd) X``.
        eps: guards the column normalisation.
    """

    def __init__(
        self,
        params,
        lr: float = 0.01,
        mu: float = 0.95,
        rank_fraction: float = 1.0,
        weight_decay: float = 0.0,
        transposed: bool = False,
        eps: float = 1e-8,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"mu must lie in [0, 1), got {mu}")
        if not 0.0 < rank_fraction <= 1.0:
            raise ValueError(f"rank_fraction must lie in (0, 1], got {rank_fraction}")
        defaults = dict(
            lr=lr, mu=mu, rank_fraction=rank_fraction, weight_decay=weight_decay, transposed=transposed, eps=eps
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(f"Dion takes 2-D parameters only, got shape {tuple(param.shape)}")

    def _state(self, param: torch.Tensor, matrix_shape: torch.Size, rank_fraction: float) -> dict:
        state = self.state[param]
        if not state:
            m, n = matrix_shape
            state["buffer"] = torch.zeros(matrix_shape, dtype=torch.float32, device=param.device)  # [m, n]
            q = torch.randn(n, dion_rank(matrix_shape, rank_fraction), dtype=torch.float32, device=param.device)
            state["q"] = q / q.norm(dim=0, keepdim=True)  # [n, r]
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                grad = grad.T if group["transposed"] else grad  # [m, n] = [out, in]
                state = self._state(param, grad.shape, group["rank_fraction"])
                result = dion_power_step(state["buffer"], grad, state["q"], group["mu"], group["eps"])
                state["buffer"], state["q"] = result.buffer, result.q
                m, n = grad.shape
                update = result.p @ result.q.T  # [m, n]
                update = update.T if group["transposed"] else update
                param.mul_(1.0 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"] * math.sqrt(m / n))
        return loss
