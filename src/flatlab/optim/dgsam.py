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

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flatlab._checks import check_choice, check_nonnegative, check_positive, check_positive_int
from flatlab.optim._tree import add_scaled_, global_norm, restore_, snapshot
from flatlab.optim.base import SharpnessAware
from flatlab.optim.schedules import Schedule

Closure = Callable[[], torch.Tensor]
#: ``call(closure, first)`` runs one pass; ``first`` is True for a domain's first visit (the
#: optimizer shell lets only such passes update BatchNorm statistics).
PassFn = Callable[[Closure, bool], torch.Tensor]
COMBINE_RULES = ("reuse_all", "perturbed_mean")


def check_closures(closures: Sequence[Closure], num_domains: int | None = None) -> list[Closure]:
    """Return ``closures`` as a list, raising unless it is a non-empty list of callables.

    ``num_domains`` (when the optimizer was told the domain count) must equal ``len(closures)``.
    """
    if callable(closures):
        raise TypeError(
            "closures must be a list with one closure per training domain, got a single callable"
        )
    closures = list(closures)
    if len(closures) == 0:
        raise ValueError("closures must hold one closure per training domain, got an empty list")
    for i, c in enumerate(closures):
        if not callable(c):
            raise TypeError(f"closures[{i}] must be callable, got {type(c).__name__}")
    if num_domains is not None and len(closures) != num_domains:
        raise ValueError(
            f"len(closures) must equal num_domains={num_domains}, got {len(closures)}"
        )
    return closures


def check_radius(name: str, value: Any) -> float | Schedule:
    """Return a radius: a schedule as is, else a real number >= 0 (raising otherwise)."""
    return value if isinstance(value, Schedule) else check_nonnegative(name, value)


def check_order(order: Sequence[int], num_domains: int) -> list[int]:
    """Return ``order`` as a list, raising unless it is a permutation of ``range(num_domains)``."""
    order = [int(i) for i in order]
    if sorted(order) != list(range(num_domains)):
        raise ValueError(f"order must be a permutation of range({num_domains}), got {order}")
    return order


def current_gradients(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The current ``.grad`` tensors themselves (not copies; zeros where a grad is None)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]


def gradients_of(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Copy the current ``.grad`` of every parameter (zeros where it is None)."""
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params
    ]


def plain_call(closure: Closure, first: bool) -> torch.Tensor:
    """Run ``closure`` with gradients enabled (``first`` is ignored): the kernels' default."""
    with torch.enable_grad():
        return closure()


def _call(call: PassFn, closure: Closure, first: bool, index: int) -> torch.Tensor:
    loss = call(closure, first)
    if loss is None:
        raise TypeError(f"closure {index} must return the loss, got None")
    return loss.detach() if isinstance(loss, torch.Tensor) else torch.as_tensor(float(loss))


def dgsam_gradient(
    params: Sequence[torch.Tensor],
    closures: Sequence[Closure],
    order: Sequence[int],
    *,
    rho: float,
    combine: str = "reuse_all",
    eps: float = 1e-12,
    call: PassFn = plain_call,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run one DGSAM sweep over the domains and return ``(G, losses)``; ``params`` end restored.

    Args:
        params: the parameters (list of tensors, any shapes), perturbed in place and restored
            exactly from a saved copy before returning.
        closures: one closure per domain; each zeroes the gradients, runs forward and backward
            on that domain's minibatch and returns its loss.
        order: a permutation of ``range(S)``: ``order[0]`` is visited first and again last.
        rho: perturbation radius of each of the S single-domain ascent steps (>= 0).
        combine: ``"reuse_all"`` (authors' rule) or ``"perturbed_mean"`` (ERM at rho=0).
        eps: added to every gradient norm before dividing (> 0).
        call: runs one pass, ``call(closure, first)`` (default: just call the closure).

    Returns:
        ``G`` aligned with ``params`` (the combined gradient of the module docstring) and the
        S+1 losses (0-d tensors) in visiting order (the first at the unperturbed point).

    Raises:
        ValueError / TypeError: bad closures, order, rho, combine or eps.
    """
    closures = check_closures(closures)
    s = len(closures)
    order = check_order(order, s)
    check_nonnegative("rho", rho)
    check_positive("eps", eps)
    check_choice("combine", combine, COMBINE_RULES)
    params = list(params)
    saved = snapshot(params)
    losses: list[torch.Tensor] = []
    first: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []  # sum of g_2 .. g_{S+1}
    try:
        for j in range(s + 1):
            d = order[j % s]
            losses.append(_call(call, closures[d], j < s, d))
            g = current_gradients(params)  # valid until the next closure zeroes them
            if j == 0:
                first = [t.clone() for t in g]
            elif j == 1:
                rest = [t.clone() for t in g]
            else:
                torch._foreach_add_(rest, g)
            if j < s and rho > 0:  # the perturbation after g_{S+1} would be undone at once
                add_scaled_(params, g, rho / (float(global_norm(g)) + eps))
    finally:
        restore_(params, saved)
    if combine == "reuse_all":
        combined = torch._foreach_add(first, rest)
        torch._foreach_mul_(combined, s / (s + 1))
    else:
        combined = torch._foreach_mul(rest, 1.0 / s)
    return combined, losses


def random_order(num_domains: int, generator: torch.Generator | None = None) -> list[int]:
    """A uniformly random permutation of ``range(num_domains)`` drawn from ``generator``."""
    return torch.randperm(num_domains, generator=generator).tolist()


class DGSAM(SharpnessAware):
    """DGSAM on the shared shell: ``loss = opt.step([closure_1, ..., closure_S])``.

    Args:
        params: parameters or parameter groups (see :class:`SharpnessAware`).
        base: base optimizer class (built with ``**base_kwargs``) or instance; the authors
            use Adam.
        rho: radius of each single-domain ascent step, a float >= 0 or a schedule
            (default 0.05, the authors' code default).
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
    the step's visiting order and its S+1 losses. BatchNorm statistics are updated on each
    domain's first visit only. Example::

        opt = DGSAM(model.parameters(), torch.optim.Adam, rho=0.05, lr=1e-3)
        loss = opt.step([make_closure(x_d, y_d) for x_d, y_d in domain_batches])
    """

    per_domain = True

    def __init__(
        self,
        params: Any,
        base: Any,
        rho: Any = 0.05,
        *,
        combine: str = "reuse_all",
        num_domains: int | None = None,
        domain_order: Sequence[int] | None = None,
        seed: int | None = None,
        eps: float = 1e-12,
        **kwargs: Any,
    ) -> None:
        rho = check_radius("rho", rho)
        self.combine = check_choice("combine", combine, COMBINE_RULES)
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

    def _descent(self, closures: Sequence[Closure]) -> torch.Tensor:
        closures = check_closures(closures, self.num_domains)
        s = len(closures)
        self.closure_calls = s + 1
        order = self.domain_order or random_order(s, self.generator)
        params = [p for g in self.param_groups for p in g["params"]]
        combined, losses = dgsam_gradient(
            params, closures, order, rho=self.radius("rho"), combine=self.combine,
            eps=self.eps, call=lambda c, first: self._pass(c, first=first),
        )
        for p, g in zip(params, combined):
            if p.grad is not None:
                p.grad.copy_(g)
        self.last_order, self.last_losses = order, losses
        loss = torch.stack(losses[:s]).mean()
        self._check_finite(loss)
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
