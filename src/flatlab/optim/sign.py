"""SignSGD (optionally with momentum: signum) and RMSpropW, the discrete updates whose SDEs
Compagnoni et al. (ICLR 2025, arXiv 2411.15958) derive; see ``flatlab.sde``.

With g_k the minibatch gradient, lr the learning rate eta and weight decay gamma (decoupled,
applied to the current iterate x_k as in AdamW)::

    SignSGD:   m_{k+1} = beta m_k + (1 - beta) g_k          (m = g when momentum beta = 0)
               x_{k+1} = x_k - eta sign(m_{k+1}) - eta gamma x_k
    RMSpropW:  v_{k+1} = beta v_k + (1 - beta) g_k^2        (v_0 = 0, no bias correction)
               x_{k+1} = x_k - eta g_k / (sqrt(v_{k+1}) + eps) - eta gamma x_k

SignSGD with momentum is signum (Bernstein et al., ICML 2018, arXiv 1802.04434). sign(0) = 0.
Each step is a foreach kernel over all parameters of a group (``signsgd_step``,
``rmspropw_step``); tests compare it with a plain per-tensor loop in float64.
State keys: ``momentum_buffer`` (SignSGD with momentum > 0), ``square_avg`` (RMSpropW).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from flatlab._checks import check_in_range, check_nonnegative, check_positive

__all__ = ["RMSpropW", "SignSGD", "rmspropw_step", "signsgd_step"]


def signsgd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    momentum_buffers: list[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """In place: ``m = beta m + (1-beta) g`` (if buffers), ``x -= lr sign(m) + lr wd x``."""
    if momentum_buffers is not None:
        torch._foreach_lerp_(momentum_buffers, grads, 1.0 - momentum)
        direction = torch._foreach_sign(momentum_buffers)
    else:
        direction = torch._foreach_sign(grads)
    if weight_decay != 0:
        torch._foreach_add_(direction, params, alpha=weight_decay)
    torch._foreach_add_(params, direction, alpha=-lr)


def rmspropw_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    square_avgs: list[torch.Tensor],
    *,
    lr: float,
    beta: float,
    eps: float,
    weight_decay: float,
) -> None:
    """In place: ``v = beta v + (1-beta) g^2``, ``x -= lr g / (sqrt(v) + eps) + lr wd x``."""
    torch._foreach_mul_(square_avgs, beta)
    torch._foreach_addcmul_(square_avgs, grads, grads, value=1.0 - beta)
    denom = torch._foreach_sqrt(square_avgs)
    torch._foreach_add_(denom, eps)
    step = torch._foreach_div(grads, denom)
    if weight_decay != 0:
        torch._foreach_add_(step, params, alpha=weight_decay)
    torch._foreach_add_(params, step, alpha=-lr)


class _Simple(Optimizer):
    """Shared loop: gather params with grads per group, then call the group kernel."""

    def _check_grads(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure must be callable, got {closure!r}")
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._check_grads(params)
                self._group_step(group, params, [p.grad for p in params])
        return loss

    def _group_step(self, group: dict, params: list, grads: list) -> None:
        raise NotImplementedError


class SignSGD(_Simple):
    """SignSGD / signum with decoupled weight decay (update rule in the module docstring).

    Args:
        params: parameters or parameter groups.
        lr (float): learning rate eta > 0 (default: 1e-3).
        momentum (float): beta in [0, 1); 0 is plain SignSGD (default: 0).
        weight_decay (float): decoupled weight decay gamma >= 0 (default: 0).
    """

    def __init__(
        self, params: Any, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        defaults = {
            "lr": check_positive("lr", lr),
            "momentum": check_in_range("momentum", momentum, 0.0, 1.0),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
        }
        super().__init__(params, defaults)

    def _group_step(self, group: dict, params: list, grads: list) -> None:
        bufs = None
        if group["momentum"] != 0:
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
        signsgd_step(
            params, grads, bufs,
            lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
        )


class RMSpropW(_Simple):
    """RMSprop with decoupled weight decay (update rule in the module docstring).

    Args:
        params: parameters or parameter groups.
        lr (float): learning rate eta > 0 (default: 1e-3).
        beta (float): decay of the squared-gradient average, in [0, 1) (default: 0.99).
        eps (float): added to sqrt(v), >= 0 (default: 1e-8).
        weight_decay (float): decoupled weight decay gamma >= 0 (default: 1e-2).
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        beta: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        defaults = {
            "lr": check_positive("lr", lr),
            "beta": check_in_range("beta", beta, 0.0, 1.0),
            "eps": check_nonnegative("eps", eps),
            "weight_decay": check_nonnegative("weight_decay", weight_decay),
        }
        super().__init__(params, defaults)

    def _group_step(self, group: dict, params: list, grads: list) -> None:
        avgs = []
        for p in params:
            state = self.state[p]
            if "square_avg" not in state:
                state["square_avg"] = torch.zeros_like(p)
            avgs.append(state["square_avg"])
        rmspropw_step(
            params, grads, avgs,
            lr=group["lr"], beta=group["beta"], eps=group["eps"],
            weight_decay=group["weight_decay"],
        )
