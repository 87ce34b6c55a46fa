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
from flatlab.optim._domains import Closure, FreeContext, check_closures, mean_domain_gradient
from flatlab.optim._step import StepContext
from flatlab.optim._tree import global_norm
from flatlab.optim.base import SharpnessAware
from flatlab.optim.dgsam import _refuse_carried
from flatlab.optim.schedules import Schedule

__all__ = ["SAGM", "sagm_combine", "sagm_gradient"]


def sagm_combine(g: list[torch.Tensor], g_p: list[torch.Tensor]) -> list[torch.Tensor]:
    """``G = (g + g_p) / 2``."""
    out = torch._foreach_add(g, g_p)
    torch._foreach_mul_(out, 0.5)
    return out


def sagm_sweep(
    ctx: Any, closures: Sequence[Closure], *, rho: str | float, alpha: float, eps: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The 2S passes of one SAGM step on a step context; ``(G, losses at theta)``, theta
    restored. The perturbation is ``rho_g g/(||g|| + eps) - alpha g`` per group ``g``."""
    g, losses = mean_domain_gradient(ctx, closures, first=True)
    (norm,) = ctx.finite(torch.stack(losses).sum(), global_norm(g))
    ctx.perturb_(g, rho, 1.0 / (norm + eps))
    ctx.perturb_(g, 1.0, -alpha)
    g_p, _ = mean_domain_gradient(ctx, closures, first=False)
    ctx.restore()
    return sagm_combine(g, g_p), losses


def sagm_gradient(
    params: Sequence[torch.Tensor],
    closures: Sequence[Closure],
    *,
    rho: float,
    alpha: float,
    eps: float = 1e-12,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """SAGM's combined gradient ``G`` and the S losses at theta, over plain tensors.

    Args:
        params: parameters (perturbed in place, restored exactly before returning).
        closures: one closure per domain (zero grads, forward, backward, return the loss).
        rho: ascent radius (>= 0).
        alpha: gradient-matching shift of the perturbation (a real number; 0 gives SAM's
            perturbation and ``G = (g + g_SAM) / 2``).
        eps: added to the gradient norm before dividing (> 0).

    Raises:
        ValueError / TypeError: bad closures, rho, alpha or eps.
    """
    closures = check_closures(closures, owner="sagm_gradient")
    rho = check_nonnegative("rho", rho)
    alpha = check_real("alpha", alpha)
    eps = check_positive("eps", eps)
    ctx = FreeContext(params)
    try:
        return sagm_sweep(ctx, closures, rho=rho, alpha=alpha, eps=eps)
    finally:
        ctx.restore()


class SAGM(SharpnessAware):
    """SAGM on the shared shell: ``loss = opt.step([closure_1, ..., closure_S])``.

    Args:
        params: parameters or parameter groups (see :class:`SharpnessAware`; a group may set
            its own ``rho``).
        base: base optimizer class (built with ``**base_kwargs``) or instance (authors: Adam).
        rho: ascent radius, float >= 0 or a schedule (default 0.05, the authors' value).
        alpha: gradient-matching coefficient >= 0 (default 1e-3; the authors tune it in
            {5e-4, 1e-3}).
        eps: added to the gradient norm (> 0).
        **kwargs: the shell's options and the base optimizer's keyword arguments.

    Costs 2S single-domain passes per step (2 pooled passes' worth, like SAM); BatchNorm
    statistics are updated by the first pass only. ``step`` returns the mean of the S domain
    losses at the unperturbed point.
    """

    per_domain = True

    def __init__(
        self, params: Any, base: Any, rho: float | Schedule = 0.05, *, alpha: float = 1e-3,
        eps: float = 1e-12, **kwargs: Any,
    ) -> None:
        self.alpha = check_nonnegative("alpha", alpha)
        self.eps = check_positive("eps", eps)
        self._domains = 0
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _closure_calls(self) -> int:
        if not self._domains:
            raise AttributeError("closure_calls is 2 S: take a step first")
        return 2 * self._domains

    def _descent(self, ctx: StepContext, closures: Sequence[Closure]) -> torch.Tensor:
        _refuse_carried(ctx, self)
        self._domains = len(closures)
        combined, losses = sagm_sweep(ctx, closures, rho="rho", alpha=self.alpha, eps=self.eps)
        ctx.set_grads(combined)
        loss = torch.stack(losses).mean()
        ctx.finite(loss)
        return loss
