"""DGSAM: per-domain ("individual") sharpness-aware minimization for domain generalization.

Song, Hwang, Lee, Lee, Lim, "DGSAM: Domain Generalization via Individual Sharpness-Aware
Minimization" (v2: "Global Sharpness-Aware Minimization Is Suboptimal in Domain
Generalization"), arXiv 2503.23430.

With S training domains with losses ``L_1 .. L_S`` and one minibatch per domain, one step is

.. code-block:: text

    pi            = a random permutation of the S domains (fresh every step)
    theta^(0)     = theta_t
    for j = 1 .. S+1:
        d_j       = pi[(j-1) mod S]                  # step S+1 revisits pi[0], same minibatch
        g_j       = grad L_{d_j}(theta^(j-1))        # one single-domain forward-backward pass
        theta^(j) = theta^(j-1) + rho * g_j / (||g_j|| + eps)   # full radius, accumulating
    theta         = theta_t                          # restored from a saved copy, exactly
    G             = S/(S+1) * sum_{j=1}^{S+1} g_j    # combine="reuse_all" (the authors' rule)
    G             = 1/S * sum_{j=2}^{S+1} g_j        # combine="perturbed_mean" (option)
    base optimizer step with gradient G

so gradient j is taken at ``theta_t + rho * sum_{k<j} g_k / ||g_k||`` and the step costs S+1
single-domain passes (SAM: 2 pooled passes = 2S domain passes; ERM: 1 pooled pass = S).

**Per-domain radius** (``radius_rule``). Each of the S applied ascent steps has norm ``r``, so
the total perturbation ``e = r * sum_{j<=S} u_j`` (``u_j = g_j / ||g_j||``) has
``||e|| <= S r``: at ``r = rho`` (``"full"``, the authors' code) DGSAM's last gradients are
taken up to ``S rho`` away, while SAM's is taken exactly ``rho`` away, so "equal rho" compares
different radii. The two rules that match SAM's total perturbation:

.. code-block:: text

    radius_rule = "full"   r = rho           ||e|| <= S rho          (authors' code, default)
    radius_rule = "sqrt"   r = rho / sqrt(S) ||e|| =  rho  when the u_j are orthogonal,
                                             ||e|| <= sqrt(S) rho always
    radius_rule = "split"  r = rho / S       ||e|| <= rho  always (triangle inequality),
                                             ||e|| =  rho  when the u_j are aligned

``"split"`` is the one that guarantees SAM's bound ``||e|| <= rho``; ``"sqrt"`` matches it for
domains whose gradients are mutually orthogonal (the typical case of nearly unrelated
high-dimensional gradients). Which rule the authors' paper uses could not be established (its
body was not readable; the extracted code uses the full ``rho`` per domain step).

``combine="reuse_all"`` is the rule of the authors' DomainBed code (as extracted by a third
party; see the research note): every gradient computed on the way is reused as a descent
gradient. At ``rho = 0`` it is **not** ERM: it becomes ``S/(S+1) * (sum_d g_d + g_{pi[0]})``,
i.e. ``S^2/(S+1)`` times the pooled gradient plus a random one-domain bias (domain ``pi[0]``
is counted twice), and its scale is about S times the pooled mean gradient (harmless under
Adam, which the authors use; it multiplies the learning rate under SGD).

``combine="perturbed_mean"`` keeps g_1 only as the first ascent direction and averages the S
gradients taken at perturbed points, one per domain (``g_2 .. g_{S+1}`` cover every domain
exactly once). At ``rho = 0`` it is the mean of the per-domain gradients, i.e. the pooled ERM
gradient for equal per-domain batches; with S = 1 it is SAM.

Shapes: ``params`` is a list of tensors of any shapes; every gradient list is aligned with it.
The norm ``||g||`` is the global L2 norm over all parameters.

Notes on the source: the rule above follows a third-party extraction of the authors'
DomainBed ``algorithms.py``; we could not read the paper's Algorithm 1 itself, so a different
weighting there (e.g. excluding ``g_1``) is possible, which is one reason ``perturbed_mean``
exists. Departure from that code: the perturbation after ``g_{S+1}`` is not applied (it
would be undone at once), and the parameters are restored from a copy, not by subtracting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flatlab._checks import check_choice, check_nonnegative, check_positive, check_positive_int
from flatlab.optim._domains import (
    FreeContext,
    check_closures,
    check_order,
    random_order,
)
from flatlab.optim._step import StepContext
from flatlab.optim._tree import global_norm
from flatlab.optim.base import SharpnessAware
from flatlab.optim.schedules import Schedule

__all__ = [
    "COMBINE_RULES", "DGSAM", "RADIUS_RULES", "dgsam_combine", "dgsam_gradient",
    "domain_radius_factor", "random_order",
]

Closure = Callable[[], torch.Tensor]
COMBINE_RULES = ("reuse_all", "perturbed_mean")
RADIUS_RULES = ("full", "sqrt", "split")


def domain_radius_factor(radius_rule: str, num_domains: int) -> float:
    """``r / rho`` of each single-domain ascent step: 1 (``"full"``), ``1/sqrt(S)``
    (``"sqrt"``) or ``1/S`` (``"split"``); see the module docstring.

    Example:
        >>> domain_radius_factor("split", 4), domain_radius_factor("sqrt", 4)
        (0.25, 0.5)
    """
    check_choice("radius_rule", radius_rule, RADIUS_RULES)
    check_positive_int("num_domains", num_domains)
    if radius_rule == "full":
        return 1.0
    if radius_rule == "sqrt":
        return 1.0 / math.sqrt(num_domains)
    return 1.0 / num_domains


def dgsam_combine(
    first: list[torch.Tensor], rest: list[torch.Tensor], num_domains: int, combine: str
) -> list[torch.Tensor]:
    """The combined gradient ``G`` from ``g_1`` (``first``) and ``sum_{j>=2} g_j`` (``rest``):
    ``S/(S+1) (g_1 + rest)`` for ``"reuse_all"``, ``rest / S`` for ``"perturbed_mean"``."""
    if combine == "reuse_all":
        out = torch._foreach_add(first, rest)
        torch._foreach_mul_(out, num_domains / (num_domains + 1))
        return out
    return torch._foreach_mul(rest, 1.0 / num_domains)


def dgsam_sweep(
    ctx: Any, closures: Sequence[Closure], order: Sequence[int], *, rho: str | float,
    combine: str, eps: float, radius_rule: str = "full",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The S+1 passes of one DGSAM step on a step context; returns ``(G, losses)`` with theta
    restored. ``rho`` is a radius name (per-group radii) or a number; each ascent step has
    radius ``rho * domain_radius_factor(radius_rule, S)``."""
    s = len(closures)
    factor = domain_radius_factor(radius_rule, s)
    losses: list[torch.Tensor] = []
    first: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []  # sum of g_2 .. g_{S+1}
    for j in range(s + 1):
        d = order[j % s]
        loss = ctx.gradient(closures[d], first=j == 0)
        losses.append(loss)
        g = ctx.grads()  # valid until the next pass
        (norm,) = ctx.finite(loss, global_norm(g))
        if j == 0:
            first = [t.clone() for t in g]
        elif j == 1:
            rest = [t.clone() for t in g]
        else:
            torch._foreach_add_(rest, g)
        if j < s:  # the perturbation after g_{S+1} would be undone at once
            ctx.perturb_(g, rho, factor / (norm + eps))
    ctx.restore()
    return dgsam_combine(first, rest, s, combine), losses


def dgsam_gradient(
    params: Sequence[torch.Tensor],
    closures: Sequence[Closure],
    order: Sequence[int],
    *,
    rho: float,
    combine: str = "reuse_all",
    eps: float = 1e-12,
    radius_rule: str = "full",
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One DGSAM sweep over plain tensors (outside an optimizer): ``(G, losses)``.

    Args:
        params: the parameters (list of tensors, any shapes), perturbed in place and restored
            exactly from a saved copy before returning (also when a closure raises).
        closures: one closure per domain; each runs forward and backward on that domain's
            minibatch and returns its loss.
        order: a permutation of ``range(S)``: ``order[0]`` is visited first and again last.
        rho: perturbation radius of each of the S single-domain ascent steps (>= 0).
        combine: ``"reuse_all"`` (authors' rule) or ``"perturbed_mean"`` (ERM at rho=0).
        eps: added to every gradient norm before dividing (> 0).
        radius_rule: each step's radius: ``"full"`` rho (authors), ``"sqrt"`` rho/sqrt(S),
            ``"split"`` rho/S (total perturbation <= rho); module docstring.

    Returns:
        ``G`` aligned with ``params`` and the S+1 losses (0-d tensors) in visiting order.
    """
    closures = check_closures(closures, owner="dgsam_gradient")
    order = check_order(order, len(closures))
    rho = check_nonnegative("rho", rho)
    eps = check_positive("eps", eps)
    check_choice("combine", combine, COMBINE_RULES)
    check_choice("radius_rule", radius_rule, RADIUS_RULES)
    ctx = FreeContext(params)
    try:
        return dgsam_sweep(ctx, closures, order, rho=rho, combine=combine, eps=eps,
                           radius_rule=radius_rule)
    finally:
        ctx.restore()


class DGSAM(SharpnessAware):
    """DGSAM on the shared shell: ``loss = opt.step([closure_1, ..., closure_S])``.

    Args:
        params: parameters or parameter groups (see :class:`SharpnessAware`; a group may set
            its own ``rho``).
        base: base optimizer class (built with ``**base_kwargs``) or instance; the authors
            use Adam.
        rho: perturbation radius, a float >= 0 or a schedule (default 0.05, the authors'
            code default); each single-domain ascent step has radius
            ``rho * domain_radius_factor(radius_rule, S)``.
        radius_rule: ``"full"`` (default, the authors' code: every step rho, total up to
            S rho), ``"sqrt"`` (rho / sqrt(S)) or ``"split"`` (rho / S: total <= rho, SAM's
            bound); module docstring.
        combine: ``"reuse_all"`` (default, the authors' rule) or ``"perturbed_mean"`` (mean of
            the S perturbed gradients, one per domain: ERM at ``rho = 0``); module docstring.
        num_domains: if given, every step must get exactly this many closures.
        domain_order: a fixed visiting order (a permutation of ``range(S)``) instead of a fresh
            random one per step (tests, ablations).
        seed: seed of the optimizer's own generator for the domain order (saved in
            ``state_dict``); None draws from torch's global generator.
        eps: added to each gradient norm (> 0).
        **kwargs: the shell's options (``sync``, ``on_nonfinite``, ``clip_grad_norm``, ...) and
            the base optimizer's keyword arguments (``lr``, ...).

    ``step`` returns the mean of the S first-visit losses (the first one at ``theta_t``, the
    others at the progressively perturbed points); ``last_order`` and ``last_losses`` hold
    the step's visiting order and its S+1 losses. BatchNorm statistics are updated in the
    first pass only. Gradients accumulated before ``step`` are refused. Example::

        opt = DGSAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=1e-3)
        loss = opt.step([make_closure(x_d, y_d) for x_d, y_d in domain_batches])
    """

    per_domain = True

    def __init__(
        self,
        params: Any,
        base: Any,
        rho: float | Schedule = 0.05,
        *,
        combine: str = "reuse_all",
        radius_rule: str = "full",
        num_domains: int | None = None,
        domain_order: Sequence[int] | None = None,
        seed: int | None = None,
        eps: float = 1e-12,
        **kwargs: Any,
    ) -> None:
        self.combine = check_choice("combine", combine, COMBINE_RULES)
        self.radius_rule = check_choice("radius_rule", radius_rule, RADIUS_RULES)
        self.num_domains = None if num_domains is None else check_positive_int(
            "num_domains", num_domains
        )
        self.domain_order = None
        if domain_order is not None:
            n = len(domain_order) if num_domains is None else num_domains
            self.domain_order = check_order(domain_order, n)
            self.num_domains = n
        self.eps = check_positive("eps", eps)
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        self.last_order: list[int] = []
        self.last_losses: list[torch.Tensor] = []
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _closure_calls(self) -> int:
        s = self.num_domains or len(self.last_order)
        if not s:
            raise AttributeError("closure_calls is S + 1: give num_domains or take a step first")
        return s + 1

    def _descent(self, ctx: StepContext, closures: Sequence[Closure]) -> torch.Tensor:
        closures = check_closures(closures, self.num_domains, owner=type(self).__name__)
        _refuse_carried(ctx, self)
        s = len(closures)
        order = self.domain_order or random_order(s, self.generator)
        combined, losses = dgsam_sweep(
            ctx, closures, order, rho="rho", combine=self.combine, eps=self.eps,
            radius_rule=self.radius_rule,
        )
        ctx.set_grads(combined)
        self.last_order, self.last_losses = order, losses
        loss = torch.stack(losses[:s]).mean()
        ctx.finite(loss)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The shell's state dict plus the domain-order generator's state (when seeded)."""
        sd = super().state_dict()
        if self.generator is not None:
            sd["flatlab"]["dgsam_generator"] = self.generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        gen = state_dict.get("flatlab", {}).get("dgsam_generator")
        super().load_state_dict(state_dict)
        if gen is not None and self.generator is not None:
            self.generator.set_state(gen)


def _refuse_carried(ctx: StepContext, opt: Any) -> None:
    if ctx.carried:
        raise ValueError(
            f"{type(opt).__name__}.step found gradients accumulated before the step; per-domain "
            "methods do not support gradient accumulation across steps: accumulate inside each "
            "domain's closure instead"
        )
