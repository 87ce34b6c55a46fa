"""SAGM: sharpness-aware gradient matching, the domain-generalization baseline.

Wang, Zhang, Lei, Zhang, "Sharpness-Aware Gradient Matching for Domain Generalization",
CVPR 2023, arXiv 2303.10353. The update below is the one of the authors' code
(``domainbed/sagm/sagm.py`` in Wang-pengfei/SAGM), where ``g`` is the gradient of the loss on
the concatenated minibatch of all training domains (one *pooled* closure):

.. code-block:: text

    g     = grad L(theta)                               # 1 pooled pass
    e     = (rho / (||g|| + eps) - alpha) * g           # ascent of radius rho, minus alpha*g
    g_p   = grad L(theta + e)                           # 1 more pooled pass
    theta = theta restored exactly from a saved copy
    G     = (g + g_p) / 2                               # then one base-optimizer step with G

**Pooled (default) or per domain.** By default ``step(closure)`` takes one closure on the
pooled batch, as the authors' code does: two passes per step, like SAM, and the training loop
hands it the pooled batch like ERM. With ``per_domain=True``, ``step([closure_1, ...,
closure_S])`` takes one closure per domain and writes ``g`` as the mean of the per-domain
gradients, ``g = 1/S sum_d grad L_d`` (2S single-domain passes): the same update only when
every domain's minibatch has the same size, since the pooled mean weights domain ``d`` by
``n_d / sum n``. Closures that carry a ``batch_size`` attribute (the training loop's do) are
compared, and a ``UserWarning`` is raised when the sizes differ.

The paper's objective is ``L(theta) + L_p(theta) + gradient matching``: minimizing the
average of the loss and the perturbed loss while keeping their gradients aligned; the
``- alpha * g`` shift of the perturbation is what implements the matching term to first
order. At ``rho = alpha = 0``, ``G = g`` exactly (``(g + g) / 2`` is exact in floating point).

Shapes: ``params`` is a list of tensors of any shapes; gradient lists are aligned with it; the
norm is the global L2 norm over all parameters. Cost: 2 pooled passes per step, like SAM.
"""

from __future__ import annotations

import warnings
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

__all__ = ["SAGM", "sagm_combine", "sagm_gradient", "warn_unequal_batches"]


def sagm_combine(g: list[torch.Tensor], g_p: list[torch.Tensor]) -> list[torch.Tensor]:
    """``G = (g + g_p) / 2``."""
    out = torch._foreach_add(g, g_p)
    torch._foreach_mul_(out, 0.5)
    return out


def sagm_sweep(
    ctx: Any, closures: Sequence[Closure], *, rho: str | float, alpha: float, eps: float
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The passes of one SAGM step on a step context (2 for one pooled closure, 2S for S
    per-domain closures); ``(G, losses at theta)``, theta restored. The perturbation is
    ``rho_g g/(||g|| + eps) - alpha g`` per group ``g``."""
    g, losses = mean_domain_gradient(ctx, closures, first=True)
    (norm,) = ctx.finite(torch.stack(losses).sum(), global_norm(g))
    ctx.perturb_(g, rho, 1.0 / (norm + eps))
    ctx.perturb_(g, 1.0, -alpha)
    g_p, _ = mean_domain_gradient(ctx, closures, first=False)
    ctx.restore()
    return sagm_combine(g, g_p), losses


def warn_unequal_batches(closures: Sequence[Closure]) -> bool:
    """Warn (``UserWarning``) and return True when the closures' ``batch_size`` attributes
    differ: the mean of per-domain gradients is then not the pooled gradient."""
    sizes = [getattr(c, "batch_size", None) for c in closures]
    known = [int(n) for n in sizes if n is not None]
    if len(set(known)) <= 1:
        return False
    warnings.warn(
        f"SAGM(per_domain=True) got domain minibatches of different sizes {known}: the mean of "
        "the per-domain gradients weights every domain equally and is not the pooled gradient "
        "of the authors' code; use the default pooled closure or equal batches",
        UserWarning, stacklevel=4,
    )
    return True


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
    """SAGM on the shared shell: ``loss = opt.step(closure)`` on the pooled batch (default), or
    ``opt.step([closure_1, ..., closure_S])`` with ``per_domain=True``.

    Args:
        params: parameters or parameter groups (see :class:`SharpnessAware`; a group may set
            its own ``rho``).
        base: base optimizer class (built with ``**base_kwargs``) or instance (authors: Adam).
        rho: ascent radius, float >= 0 or a schedule (default 0.05, the authors' value).
        alpha: gradient-matching coefficient >= 0 (default 1e-3; the authors tune it in
            {5e-4, 1e-3}).
        eps: added to the gradient norm (> 0).
        per_domain: False (default): ``step(closure)`` with one pooled closure, 2 passes, as
            the authors' code; True: ``step([closure_1, ..., closure_S])``, 2S single-domain
            passes, warning when the closures' ``batch_size`` differ (module docstring).
        **kwargs: the shell's options and the base optimizer's keyword arguments.

    Costs 2 pooled passes per step (per domain: 2S single-domain passes, the same work),
    like SAM; BatchNorm statistics are updated by the first pass only. ``step`` returns the
    loss at the unperturbed point (per domain: the mean of the S domain losses there).
    Gradients accumulated before ``step`` enter every pass (as for SAM) in the pooled form
    and are refused in the per-domain form.
    """

    per_domain = False

    def __init__(
        self, params: Any, base: Any, rho: float | Schedule = 0.05, *, alpha: float = 1e-3,
        eps: float = 1e-12, per_domain: bool = False, **kwargs: Any,
    ) -> None:
        self.alpha = check_nonnegative("alpha", alpha)
        self.eps = check_positive("eps", eps)
        if not isinstance(per_domain, bool):
            raise TypeError(f"per_domain must be a bool, got {per_domain!r}")
        self.per_domain = per_domain
        self._domains = 0 if per_domain else 1
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _closure_calls(self) -> int:
        if not self._domains:
            raise AttributeError("closure_calls is 2 S: take a step first")
        return 2 * self._domains

    def _descent(self, ctx: StepContext, closures: Any) -> torch.Tensor:
        if self.per_domain:
            _refuse_carried(ctx, self)
            warn_unequal_batches(closures)
        else:
            closures = [closures]
        self._domains = len(closures)
        combined, losses = sagm_sweep(ctx, closures, rho="rho", alpha=self.alpha, eps=self.eps)
        ctx.set_grads(combined)
        loss = torch.stack(losses).mean()
        ctx.finite(loss)
        return loss
