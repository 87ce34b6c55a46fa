"""SAGM: sharpness-aware gradient matching, the domain-generalization baseline.

Wang, Zhang, Lei, Zhang, "Sharpness-Aware Gradient Matching for Domain Generalization",
CVPR 2023, arXiv 2303.10353. The update below is the one of the authors' code
(``domainbed/sagm/sagm.py`` in Wang-pengfei/SAGM), with the gradient of the pooled loss
written as the mean of the per-domain gradients (equal minibatch per domain):

.. code-block:: text

    g     = 1/S * sum_d grad L_d(theta)                 # S single-domain passes = 1 pooled
    e     = (rho / (||g|| + eps) - alpha) * g           # ascent of radius rho, minus alpha*g
    g_p   = 1/S * sum_d grad L_d(theta + e)             # S more passes = 1 pooled
    theta = theta restored exactly from a saved copy
    G     = (g + g_p) / 2                               # then one base-optimizer step with G

The paper's objective is ``L(theta) + L_p(theta) + gradient matching``: minimizing the
average of the loss and the perturbed loss while keeping their gradients aligned; the
``- alpha * g`` shift of the perturbation is what implements the matching term to first
order. At ``rho = alpha = 0``, ``G = g`` exactly (``(g + g) / 2`` is exact in floating point).

Shapes: ``params`` is a list of tensors of any shapes; gradient lists are aligned with it; the
norm is the global L2 norm over all parameters. Cost: 2 pooled passes per step, like SAM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from flatlab._checks import check_nonnegative, check_positive, check_real
from flatlab.optim._tree import add_scaled_, global_norm, restore_, snapshot
from flatlab.optim.base import SharpnessAware
from flatlab.optim.dgsam import (
    Closure,
    PassFn,
    _call,
    check_closures,
    check_radius,
    gradients_of,
    plain_call,
)


def mean_domain_gradient(
    params: Sequence[torch.Tensor],
    closures: Sequence[Closure],
    call: PassFn = plain_call,
    first: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run every closure once at the current point; return the mean gradient and the losses."""
    total: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    for d, closure in enumerate(closures):
        losses.append(_call(call, closure, first, d))
        g = gradients_of(params)
        if d == 0:
            total = g
        else:
            torch._foreach_add_(total, g)
    torch._foreach_mul_(total, 1.0 / len(closures))
    return total, losses


def sagm_gradient(
    params: Sequence[torch.Tensor],
    closures: Sequence[Closure],
    *,
    rho: float,
    alpha: float,
    eps: float = 1e-12,
    call: PassFn = plain_call,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Return SAGM's combined gradient ``G`` and the S losses at the unperturbed point.

    Args:
        params: parameters (perturbed in place, restored exactly before returning).
        closures: one closure per domain (zero grads, forward, backward, return the loss).
        rho: ascent radius (>= 0).
        alpha: gradient-matching shift of the perturbation (a real number; 0 gives SAM's
            perturbation and ``G = (g + g_SAM) / 2``).
        eps: added to the gradient norm before dividing (> 0).
        call: runs one pass, ``call(closure, first)``; ``first`` is False for the perturbed
            passes (the optimizer shell freezes BatchNorm statistics there).

    Raises:
        ValueError / TypeError: bad closures, rho, alpha or eps.
    """
    closures = check_closures(closures)
    check_nonnegative("rho", rho)
    check_real("alpha", alpha)
    check_positive("eps", eps)
    params = list(params)
    saved = snapshot(params)
    try:
        g, losses = mean_domain_gradient(params, closures, call, True)
        scale = rho / (float(global_norm(g)) + eps) - alpha
        add_scaled_(params, g, scale)
        g_p, _ = mean_domain_gradient(params, closures, call, False)
    finally:
        restore_(params, saved)
    combined = torch._foreach_add(g, g_p)
    torch._foreach_mul_(combined, 0.5)
    return combined, losses


class SAGM(SharpnessAware):
    """SAGM on the shared shell: ``loss = opt.step([closure_1, ..., closure_S])``.

    Args:
        params: parameters or parameter groups (see :class:`SharpnessAware`).
        base: base optimizer class (built with ``**base_kwargs``) or instance (authors: Adam).
        rho: ascent radius, float >= 0 or a schedule (default 0.05, the authors' value).
        alpha: gradient-matching coefficient >= 0 (default 1e-3; the authors tune it in
            {5e-4, 1e-3}).
        eps: added to the gradient norm (> 0).
        **kwargs: the shell's options and the base optimizer's keyword arguments.

    Costs 2S single-domain passes per step (2 pooled passes' worth, like SAM); BatchNorm
    statistics are updated by the S unperturbed passes only. ``step`` returns the mean of the
    S domain losses at the unperturbed point.
    """

    per_domain = True

    def __init__(
        self, params: Any, base: Any, rho: Any = 0.05, *, alpha: float = 1e-3,
        eps: float = 1e-12, **kwargs: Any,
    ) -> None:
        rho = check_radius("rho", rho)
        self.alpha = check_nonnegative("alpha", alpha)
        self.eps = check_positive("eps", eps)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _descent(self, closures: Sequence[Closure]) -> torch.Tensor:
        closures = check_closures(closures)
        self.closure_calls = 2 * len(closures)
        params = [p for g in self.param_groups for p in g["params"]]
        combined, losses = sagm_gradient(
            params, closures, rho=self.radius("rho"), alpha=self.alpha, eps=self.eps,
            call=lambda c, first: self._pass(c, first=first),
        )
        for p, g in zip(params, combined):
            if p.grad is not None:
                p.grad.copy_(g)
        loss = torch.stack(losses).mean()
        self._check_finite(loss)
        return loss
