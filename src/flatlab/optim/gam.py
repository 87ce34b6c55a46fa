"""GAM: Gradient norm Aware Minimization, and SAM+GAM.

Zhang, Xu, Yu, Zou, Cui, "Gradient Norm Aware Minimization Seeks First-Order Flatness and
Improves Generalization", CVPR 2023, arXiv 2303.03108. GAM minimizes

    L(theta) + alpha * R1(theta),   R1(theta) = rho * max_{||t - theta|| <= rho} ||grad L(t)||

(first-order flatness). theta is a list of tensors of any shapes, flattened into one vector
for norms and inner products; H is the Hessian of the minibatch loss; u^ = u / (||u|| + xi).

``hvp="exact"`` (paper Algorithm 1, Hessian-vector products by double backprop)::

    g     = grad L(theta)
    f     = H(theta) g^                            one HVP: gradient of ||grad L|| at theta
    t_adv = theta + rho f^                         the point of largest gradient norm
    h     = H(t_adv) g(t_adv)^                     second gradient + HVP
    d     = g_0 + alpha rho h                      g_0 = g (GAM)
                                                   g_0 = grad L(theta + rho_sam g^) (SAM+GAM)

``hvp="finite_difference"`` (the "accelerated" Algorithm 2 of the appendix, the one the public
code ships; H v ~ (grad L(theta + rho' v) - grad L(theta)) / rho', 4 passes)::

    g0 = grad L(theta);  g1 = grad L(theta + rho' g0^);  h0 = g1 - g0
    t2 = theta + rho h0^;  g2 = grad L(t2);  g3 = grad L(t2 + rho' g2^)
    h+ = alpha g1 + (1 - alpha) g3,   h- = beta g0 + (1 - beta) g2
    d  = h+ - gamma h-_perp,   h-_perp = h- - (<h-, h+> / ||h+||^2) h+

Then ``theta <- base_step(theta, d)`` and theta is restored from a snapshot before the step.

Departures from the public code (``xxgege/GAM``), following the paper instead (research note
``gam_sam_libs.md`` A4): h- applies beta to g0 (the code forgets it); all radii are floats
(the code's argparse types are ints). Parameter-sized buffers: 3 for the finite-difference
variant (snapshot, h- accumulator, alpha*g1) and 2 for the exact one (snapshot, g_0), against
6 in the public code; the HVP outputs of the exact variant are transient.

Closure calls per step (``closure_calls``): finite difference 4; exact 2 (plus 2 HVPs, no
closure calls), 3 for SAM+GAM. Zero radii (rho = rho' = 0, gamma = 0, alpha = 1 for the finite
difference variant; rho = 0 and rho_sam = 0 for the exact one) give the base optimizer bit for
bit.

How the exact variant gets the graph, without patching torch: its closure takes one argument,
a ``backward`` function, and calls ``backward(loss)`` instead of ``loss.backward()``::

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        backward(loss)
        return loss

The optimizer passes a function that computes the gradient with ``create_graph=True`` for the
passes that need Hessian-vector products; the HVP is ``torch.autograd.grad(grads, params, v)``
and the graph is dropped right after. The default argument keeps the closure usable with any
other optimizer. A closure without the argument is refused with that recipe. Not for
``torch.compile``-d models (no double backward there; refused with a clear error): use
``hvp="finite_difference"``.

Distributed (``sync="global"``): the graph passes' gradients are each rank's own (under DDP,
``autograd.grad`` bypasses the reducer), so ``g`` and ``H g^`` are averaged over ranks by
``ctx.reduce_``. Under FSDP2 the optimizer needs ``model=`` the ``fully_shard``-ed module: the
graph passes take the gradient and the products with respect to its unsharded parameters,
held for the pass (``flatlab.optim._fsdp``; every rank holds the full parameters meanwhile),
and the results are cut back to this rank's shards.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.optim import Optimizer

from flatlab._checks import check_choice, check_in_range, check_nonnegative
from flatlab.optim import _tree
from flatlab.optim._step import StepContext
from flatlab.optim.base import SharpnessAware
from flatlab.optim.sam import sam_direction
from flatlab.optim.schedules import Schedule

__all__ = ["GAM", "SAMGAM", "hessian_vector_product"]


def hessian_vector_product(
    grads: list[torch.Tensor], params: list[torch.Tensor], vector: list[torch.Tensor]
) -> list[torch.Tensor]:
    """``H v`` by double backprop: ``grads`` must carry their graph (``create_graph=True``).

    Shapes: three aligned lists, one tensor per parameter. Unused parameters give zeros.
    """
    keep = [i for i, g in enumerate(grads) if g.requires_grad]  # constant grads: H row is 0
    out: list[torch.Tensor | None] = [None] * len(params)
    if keep:
        try:
            found = torch.autograd.grad(
                [grads[i] for i in keep], params, grad_outputs=[vector[i] for i in keep],
                allow_unused=True,
            )
        except RuntimeError as err:
            if "double backward" in str(err):
                raise RuntimeError(
                    "GAM(hvp='exact') needs double backward, which torch.compile-d models do "
                    "not support; use hvp='finite_difference' or an uncompiled model"
                ) from err
            raise
        out = list(found)
    return [torch.zeros_like(p) if o is None else o.detach() for o, p in zip(out, params)]


class GAM(SharpnessAware):
    """Gradient norm Aware Minimization (update rules in the module docstring).

    Args:
        params: parameters or parameter groups.
        base: base optimizer class (built with ``**kwargs``' base keywords) or instance.
        rho (float or Schedule): radius of the gradient-norm ascent, >= 0 (default: 0.2).
        alpha (float): exact: weight of the first-order flatness R1; finite difference: the
            weight of g1 in h+ (default: 0.6).
        hvp (str): ``"finite_difference"`` (Algorithm 2, 4 passes) or ``"exact"``
            (Algorithm 1) (default: "finite_difference").
        fd_rho (float or Schedule): rho', the finite-difference radius (default: 0.02).
        beta (float): weight of g0 in h-, in [0, 1] (default: 0.5).
        gamma (float): weight of the orthogonal correction, >= 0 (default: 0.03).
        sam_rho (float, Schedule or None): exact variant only: None is GAM, a radius makes it
            SAM+GAM (descent gradient taken at theta + sam_rho g^) (default: None).
        xi (float): added to every norm so zero vectors stay finite (default: 1e-12).
        adaptive (bool): finite-difference variant only: ASAM-style scale-invariant ascents,
            as the authors' code's ``adaptive`` flag: every ascent direction ``v`` becomes
            ``T^2 v / ||T v||`` with ``T = diag(|theta_now| + eta)`` at the point it starts
            from (default: False).
        eta (float): the offset in ``T`` (default 0.0, the authors' code).
        **kwargs: shell options (see :class:`SharpnessAware`) and the base's keywords.

    Raises:
        TypeError, ValueError: bad values, named in the message.
    """

    def __init__(
        self,
        params: Any,
        base: type[Optimizer] | Optimizer,
        rho: float | Schedule = 0.2,
        alpha: float = 0.6,
        hvp: str = "finite_difference",
        fd_rho: float | Schedule = 0.02,
        beta: float = 0.5,
        gamma: float = 0.03,
        sam_rho: float | Schedule | None = None,
        xi: float = 1e-12,
        adaptive: bool = False,
        eta: float = 0.0,
        **kwargs: Any,
    ) -> None:
        self.hvp = check_choice("hvp", hvp, ("exact", "finite_difference"))
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        if adaptive and self.hvp == "exact":
            raise ValueError(
                "adaptive=True is defined (by the authors' code) for hvp='finite_difference' "
                "only, got hvp='exact'"
            )
        self.adaptive = adaptive
        self.eta = check_nonnegative("eta", eta)
        self.alpha = check_nonnegative("alpha", alpha)
        self.beta = check_in_range("beta", beta, 0.0, 1.0, closed="[]")
        self.gamma = check_nonnegative("gamma", gamma)
        self.xi = check_nonnegative("xi", xi)
        radii: dict[str, Any] = {"rho": rho}
        if self.hvp == "finite_difference":
            radii["fd_rho"] = fd_rho
            if sam_rho is not None:
                raise ValueError(
                    "sam_rho must be None for hvp='finite_difference' (Algorithm 2 already "
                    f"ascends like SAM), got {sam_rho!r}"
                )
        elif sam_rho is not None:
            radii["sam_rho"] = sam_rho
        super().__init__(params, base, radii=radii, **kwargs)

    def _closure_calls(self) -> int:
        if self.hvp == "finite_difference":
            return 4
        return 2 + ("sam_rho" in self._schedules)

    def _descent(self, ctx: StepContext, closure: Any) -> torch.Tensor:
        if self.hvp == "exact":
            return self._exact(ctx, closure)
        return self._finite_difference(ctx, closure)

    def _exact(self, ctx: StepContext, closure: Any) -> torch.Tensor:
        _check_takes_backward(closure)
        xi = self.xi
        # the graph passes' gradients are this rank's own (autograd.grad bypasses DDP's
        # reducer; under FSDP2 they are full size, of the unsharded parameters): what is
        # derived from them is averaged with reduce_ and laid out as the parameters by
        # to_params (FSDP2: this rank's shard)
        loss = ctx.gradient(closure, first=True, graph=True)
        graph_grads = ctx.graph_grads()
        g0 = [g.detach().clone() for g in graph_grads]
        ctx.reduce_(g0)  # distributed, sync="global": g of the mean loss over ranks
        (n0,) = ctx.finite(loss, _tree.global_norm(g0))
        unit = torch._foreach_div(g0, n0 + xi)
        f = hessian_vector_product(graph_grads, ctx.graph_params(), unit)  # H g^ = grad ||g||
        ctx.reduce_(f)  # the mean over ranks of H_r v is H v
        del graph_grads, unit
        (nf,) = ctx.finite(None, _tree.global_norm(f))
        g0, f = ctx.to_params(g0), ctx.to_params(f)
        ctx.set_grads(g0)  # drop the graph
        ctx.drop_graph()
        if "sam_rho" in self._schedules:
            ctx.perturb_(g0, "sam_rho", 1.0 / (n0 + xi))
            ctx.gradient(closure)
            base_grad = [g.clone() for g in ctx.grads()]
            ctx.restore(keep=True)
        else:
            base_grad = _tree.snapshot(g0)
        ctx.perturb_(f, "rho", 1.0 / (nf + xi))
        del f
        # autograd saved the norm statistics for the HVP: they are put back after it
        ctx.gradient(closure, graph=True, keep_norms_frozen=True)
        graph_grads = ctx.graph_grads()
        g_adv = [g.detach().clone() for g in graph_grads]
        ctx.reduce_(g_adv)
        (n_adv,) = ctx.finite(None, _tree.global_norm(g_adv))
        unit = torch._foreach_div(g_adv, n_adv + xi)
        h = hessian_vector_product(graph_grads, ctx.graph_params(), unit)
        ctx.reduce_(h)
        del graph_grads, unit, g_adv
        ctx.set_grads(base_grad)  # drop the graph; d = g_0 + alpha rho_g h
        ctx.drop_graph()
        ctx.release_norms()
        ctx.restore()
        ctx.add_to_grads_(ctx.to_params(h), "rho", self.alpha)
        return loss

    def _direction(
        self, ctx: StepContext, v: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The ascent direction of ``v`` and the norm that normalizes it (adaptive: T^2 v and
        ||T v||, T = |theta_now| + eta)."""
        return sam_direction(ctx.params, v, adaptive=self.adaptive, eta=self.eta)

    def _finite_difference(self, ctx: StepContext, closure: Any) -> torch.Tensor:
        xi = self.xi
        loss = ctx.gradient(closure, first=True)
        grads = ctx.grads()
        h_minus = _tree.snapshot(grads)  # g0 now, beta g0 + (1 - beta) g2 later
        direction, norm = self._direction(ctx, grads)
        (n0,) = ctx.finite(loss, norm)
        ctx.perturb_(direction, "fd_rho", 1.0 / (n0 + xi))
        del direction
        ctx.gradient(closure)  # g1 at theta + rho' g0^
        grads = ctx.grads()
        h_plus = torch._foreach_mul(grads, self.alpha)  # alpha g1
        torch._foreach_sub_(grads, h_minus)  # h0 = g1 - g0, in p.grad
        torch._foreach_mul_(h_minus, self.beta)
        ctx.restore(keep=True)
        direction, norm = self._direction(ctx, grads)
        (nh,) = ctx.finite(None, norm)
        ctx.perturb_(direction, "rho", 1.0 / (nh + xi))
        del direction
        ctx.gradient(closure)  # g2 at t2 = theta + rho h0^
        grads = ctx.grads()
        torch._foreach_add_(h_minus, grads, alpha=1.0 - self.beta)
        direction, norm = self._direction(ctx, grads)
        (n2,) = ctx.finite(None, norm)
        ctx.perturb_(direction, "fd_rho", 1.0 / (n2 + xi))
        del direction
        ctx.gradient(closure)  # g3 at t2 + rho' g2^
        grads = ctx.grads()
        torch._foreach_mul_(grads, 1.0 - self.alpha)
        torch._foreach_add_(grads, h_plus)  # h+ in p.grad
        del h_plus
        dot, sq = ctx.finite(None, _tree.dot(h_minus, grads), _tree.dot(grads, grads))
        c = dot / (sq + xi)
        torch._foreach_mul_(grads, 1.0 + self.gamma * c)
        torch._foreach_add_(grads, h_minus, alpha=-self.gamma)  # d = (1 + gamma c) h+ - gamma h-
        ctx.restore()
        return loss


def _check_takes_backward(closure: Any) -> None:
    """Exact GAM hands the closure a graph-keeping ``backward``: it must accept one."""
    try:
        params = inspect.signature(closure).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: let the call decide
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                  p.VAR_POSITIONAL)]
    if not positional:
        raise TypeError(
            "GAM(hvp='exact') needs Hessian-vector products, so its closure must take the "
            "backward function it is given and call it instead of loss.backward(): "
            "def closure(backward=torch.autograd.backward): ...; backward(loss); return loss "
            "(or use hvp='finite_difference', which takes any closure)"
        )


class SAMGAM(GAM):
    """SAM+GAM: GAM's exact variant with the descent gradient taken at SAM's perturbed point,
    ``d = grad L(theta + sam_rho g^) + alpha rho H(t_adv) g(t_adv)^`` (3 closure calls).

    Same arguments as :class:`GAM`; ``hvp`` is "exact" and ``sam_rho`` defaults to 0.05.
    """

    def __init__(
        self,
        params: Any,
        base: type[Optimizer] | Optimizer,
        rho: float | Schedule = 0.2,
        alpha: float = 0.6,
        sam_rho: float | Schedule = 0.05,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("hvp", "exact") != "exact":
            raise ValueError(f"hvp must be 'exact' for SAMGAM, got {kwargs['hvp']!r}")
        kwargs["hvp"] = "exact"
        super().__init__(params, base, rho=rho, alpha=alpha, sam_rho=sam_rho, **kwargs)
