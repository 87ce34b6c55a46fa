"""Four SAM variants on the shared shell: GSAM, WSAM, LookSAM and FriendlySAM.

Notation: theta the parameters (a list of tensors of any shapes; every norm and inner product
is over all of them concatenated, the global 2-norm, unless said otherwise), L the minibatch
loss, ``g = grad L(theta)``, ``e = rho g / (||g|| + eps)`` SAM's ascent step and
``g_p = grad L(theta + e)`` the gradient at the perturbed point. Every method hands a descent
gradient ``d`` to the base optimizer. ``rho`` is a radius of the shell: a float >= 0 or a
schedule, settable per parameter group (a group with ``rho = 0`` is not perturbed); the
methods' corrections act on the whole gradient vector, as in the papers, and are skipped when
every group's radius is 0, so that ``rho = 0`` is the base optimizer bit for bit.

GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022,
arXiv 2203.08065)::

    g_perp = g - (<g, g_p> / ||g_p||^2) g_p        # the part of g orthogonal to g_p
    d      = g_p - alpha * g_perp                  # descend the surrogate gap too

``alpha = 0`` is SAM bit for bit. The paper schedules ``rho`` proportionally to the learning
rate: pass ``rho=ProportionalToLR(...)``.

WSAM (Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a
Regularization Term", KDD 2023, arXiv 2305.15817): minimizes ``L + a (L(theta + e) - L)``
with ``a = gamma / (1 - gamma)``::

    decouple=True  (the paper's Algorithm 1, the default):
        theta <- base_step(theta, g) - lr_group * a * (g_p - g)
    decouple=False:
        d = (1 - a) g + a g_p

``gamma = 0.5`` (``a = 1``) with ``decouple=False`` is SAM bit for bit; with the decoupled
update it equals SAM only for plain SGD, and only to rounding. The decoupled sharpness term is
applied after the base step of a step that was taken (not on a skipped one); clipping and
``descent_hook`` act on ``d = g`` only.

LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022, arXiv 2203.02714): the SAM gradient only every ``k`` steps; in between the
component of ``g_p`` orthogonal to ``g`` is reused::

    every k-th step (2 passes):  g_v = g_p - (<g, g_p> / ||g||^2) g,   d = g_p
    the other steps (1 pass):    d = g + alpha * (||g|| / ||g_v||) g_v

``g_v`` is kept in ``opt.state[p]["looksam_gv"]`` (so it is in ``state_dict`` and a resumed
run continues bit for bit). ``k = 1`` is SAM bit for bit (no ``g_v`` is then stored).
``layerwise=True`` takes the projection and the scale ``||g|| / ||g_v||`` per parameter
tensor instead of over the whole vector (what pytorch_optimizer does; the paper's LookSAM is
global, its layer-wise form is "Look-LayerSAM").

FriendlySAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024, arXiv 2403.12350):
removes an estimate of the full-batch gradient, an EMA ``m`` of the minibatch gradients, from
the ascent direction::

    a = g - sigma * m          (a = g on a parameter's first step, as in the authors' code)
    e = rho a / (||a|| + eps),  d = g_p = grad L(theta + e)
    m <- lmbda * m + (1 - lmbda) * g      (m = g on the first step)

``m`` is the EMA *before* this step's gradient enters it, and starts at the first gradient,
not at 0 (the authors' code, nblt/F-SAM; pytorch_optimizer does the same). ``lmbda`` in
[0, 1] is the EMA's weight on the past (``lmbda = 1`` freezes ``m`` at the first gradient,
``lmbda = 0`` makes ``m`` the previous step's gradient). ``sigma = 0`` is SAM bit for bit for
every ``lmbda`` and then keeps no EMA. ``m`` is in ``opt.state[p]["fsam_ema"]``.

State written by a method (LookSAM's ``g_v``, FriendlySAM's ``m``) is staged with
``ctx.stage_state`` and written by the shell after the base step of a step that was taken, so a
skipped step leaves it untouched and a base optimizer that initializes its state when it is
empty (Adam, RMSprop) sees an empty state on its first step.

Cost per step: GSAM, WSAM, FriendlySAM 2 closure calls and one extra parameter-sized buffer
(``g``; FriendlySAM: ``a`` and the new ``m``) besides the shell's snapshot; LookSAM 2 closure
calls every ``k``-th step (and while no ``g_v`` is stored), 1 otherwise, plus the stored ``g_v``.

Departures from pytorch_optimizer 4.1.0 (the papers as arbiter): every method undoes the
perturbation by copying theta back (pytorch_optimizer's GSAM and WSAM subtract ``e``); norms
are taken in the parameters' precision (at least float32; pytorch_optimizer computes the
global gradient norm in float32); GSAM's projection coefficient is ``<g, g_p> / (||g_p||^2 +
eps)`` (pytorch_optimizer puts eps on the two norms separately); LookSAM is global by default
(``layerwise=True`` for pytorch_optimizer's per-tensor form), counts steps with the shell's
counter (``opt.steps``) and does a full step while no ``g_v`` is stored (pytorch_optimizer
then takes a plain step), its reuse scale is ``||g|| / (||g_v|| + eps)`` (pytorch_optimizer:
``+ 1e-8``) and a reuse step costs one closure call (pytorch_optimizer's recipe calls it twice
at theta); WSAM clips the descent gradient (pytorch_optimizer's ``max_norm`` clips ``g_p``
before mixing). No method here offers the ``adaptive`` (ASAM-style) perturbation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from flatlab._checks import check_in_range, check_nonnegative, check_positive_int
from flatlab.optim import _tree
from flatlab.optim._step import StepContext, allreduce_mean
from flatlab.optim.base import SharpnessAware, TwoPass
from flatlab.optim.schedules import Schedule

__all__ = [
    "GSAM", "WSAM", "LookSAM", "FriendlySAM",
    "gsam_descent_", "wsam_mix_", "looksam_component", "looksam_reuse_", "fsam_ascent_",
]

LOOKSAM_KEY = "looksam_gv"
FSAM_KEY = "fsam_ema"


# ---------------------------------------------------------------------- pure kernels
def gsam_descent_(g_p: list[torch.Tensor], g: list[torch.Tensor], coef: float,
                  alpha: float) -> None:
    """In place ``g_p <- g_p - alpha (g - coef g_p)`` with ``coef = <g, g_p> / ||g_p||^2``."""
    torch._foreach_mul_(g_p, 1.0 + alpha * coef)
    torch._foreach_add_(g_p, g, alpha=-alpha)


def wsam_mix_(g_p: list[torch.Tensor], g: list[torch.Tensor], a: float) -> None:
    """In place ``g_p <- (1 - a) g + a g_p`` (nothing at ``a = 1``)."""
    if a != 1.0:
        torch._foreach_lerp_(g_p, g, 1.0 - a)


def looksam_component(g: list[torch.Tensor], g_p: list[torch.Tensor], *, layerwise: bool,
                      eps: float) -> list[torch.Tensor]:
    """``g_v = g_p - (<g, g_p> / (||g||^2 + eps)) g`` (new tensors), over the whole vector or,
    ``layerwise``, per tensor."""
    if layerwise:
        coefs = (_tree.tensor_dots(g, g_p) / (_tree.tensor_dots(g, g) + eps)).tolist()
        return [b - c * a for a, b, c in zip(g, g_p, coefs)]
    coef = float(_tree.dot(g, g_p) / (_tree.global_norm(g) ** 2 + eps))
    return torch._foreach_add(g_p, g, alpha=-coef)


def looksam_reuse_(g: list[torch.Tensor], g_v: list[torch.Tensor], *, alpha: float,
                   layerwise: bool, eps: float) -> None:
    """In place ``g <- g + alpha (||g|| / (||g_v|| + eps)) g_v`` (whole vector or per tensor)."""
    if layerwise:
        scales = alpha * _tree.tensor_dots(g, g).sqrt() / (_tree.tensor_dots(g_v, g_v).sqrt()
                                                            + eps)
        for a, v, c in zip(g, g_v, scales.tolist()):
            a.add_(v, alpha=c)
        return
    scale = alpha * float(_tree.global_norm(g) / (_tree.global_norm(g_v) + eps))
    torch._foreach_add_(g, g_v, alpha=scale)


def fsam_ascent_(g: list[torch.Tensor], m: list[torch.Tensor | None], *, sigma: float,
                 lmbda: float) -> list[torch.Tensor]:
    """FriendlySAM's ascent direction in place, ``g <- a = g - sigma m``, and the new EMA
    ``m_new = lmbda m + (1 - lmbda) g`` (new tensors, from ``g`` before the update); where
    ``m`` is None (a first step) ``a = g`` and ``m_new = g``."""
    have = [i for i, x in enumerate(m) if x is not None]
    m_new = [t.clone() for t in g]
    if have:
        gs = [g[i] for i in have]
        ms = [m[i] for i in have]
        for i, t in zip(have, torch._foreach_lerp(ms, gs, 1.0 - lmbda)):
            m_new[i] = t
        torch._foreach_add_(gs, ms, alpha=-sigma)
    return m_new


# ---------------------------------------------------------------------- shell helpers
def _ascent_scale(ctx: StepContext, loss: torch.Tensor | None, direction: list[torch.Tensor],
                  eps: float) -> float:
    (n,) = ctx.finite(loss, _tree.global_norm(direction))
    return 1.0 / (n + eps)


def _sam_ascent(ctx: StepContext, loss: torch.Tensor | None, eps: float,
                keep_g: bool) -> list[torch.Tensor] | None:
    """SAM's ascent ``theta + rho g / (||g|| + eps)`` from the gradient in ``p.grad``; returns
    a copy of ``g`` when the method's combine needs it (``keep_g`` and some radius > 0)."""
    g = ctx.grads()
    scale = _ascent_scale(ctx, loss, g, eps)
    saved = _tree.snapshot(g) if keep_g and ctx.any_radius("rho") else None
    ctx.perturb_(g, "rho", scale)
    return saved


# ---------------------------------------------------------------------- GSAM
class GSAM(TwoPass):
    """Surrogate Gap Guided SAM (module docstring): ``d = g_p - alpha g_perp``.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        base: base optimizer class (built with ``**base_kwargs``) or instance.
        rho (float or Schedule): ascent radius >= 0 (default 0.05; the paper uses
            ``ProportionalToLR``).
        alpha (float): weight of the surrogate-gap term, >= 0 (default 0.4, pytorch_optimizer's).
        perturb_eps (float): added to norms before dividing (default 1e-12).
        **kwargs: shell options (:class:`SharpnessAware`) and the base's keyword arguments.

    Raises:
        TypeError / ValueError: a hyperparameter not a finite number in its range.
    """

    def __init__(self, params: Any, base: type[Optimizer] | Optimizer,
                 rho: float | Schedule = 0.05, alpha: float = 0.4, perturb_eps: float = 1e-12,
                 **kwargs: Any) -> None:
        self.alpha = check_nonnegative("alpha", alpha)
        self.perturb_eps = check_nonnegative("perturb_eps", perturb_eps)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _ascend(self, ctx: StepContext, loss: torch.Tensor | None) -> Any:
        return _sam_ascent(ctx, loss, self.perturb_eps, keep_g=self.alpha != 0.0)

    def _combine(self, ctx: StepContext, g: Any) -> None:
        if g is None:
            return
        g_p = ctx.grads()
        dot, sq = ctx.finite(None, _tree.dot(g, g_p), _tree.global_norm(g_p) ** 2)
        gsam_descent_(g_p, g, dot / (sq + self.perturb_eps), self.alpha)


# ---------------------------------------------------------------------- WSAM
class WSAM(TwoPass):
    """Weighted SAM (module docstring): sharpness weighted by ``a = gamma / (1 - gamma)``.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        base: base optimizer class or instance (every group needs an ``lr`` when
            ``decouple=True``).
        rho (float or Schedule): ascent radius >= 0 (default 0.05).
        gamma (float): sharpness weight in [0, 1) (default 0.9, the paper's and
            pytorch_optimizer's default); 0.5 weighs loss and sharpness like SAM.
        decouple (bool): apply ``-lr a (g_p - g)`` after the base step (default True, the
            paper's Algorithm 1) instead of mixing it into the descent gradient.
        perturb_eps (float): added to the gradient norm (default 1e-12).
        **kwargs: shell options and the base's keyword arguments.
    """

    def __init__(self, params: Any, base: type[Optimizer] | Optimizer,
                 rho: float | Schedule = 0.05, gamma: float = 0.9, decouple: bool = True,
                 perturb_eps: float = 1e-12, **kwargs: Any) -> None:
        self.gamma = check_in_range("gamma", gamma, 0.0, 1.0, closed="[)")
        if not isinstance(decouple, bool):
            raise TypeError(f"decouple must be a bool, got {decouple!r}")
        self.decouple = decouple
        self.perturb_eps = check_nonnegative("perturb_eps", perturb_eps)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    @property
    def weight(self) -> float:
        """``a = gamma / (1 - gamma)``."""
        return self.gamma / (1.0 - self.gamma)

    def _ascend(self, ctx: StepContext, loss: torch.Tensor | None) -> Any:
        return _sam_ascent(ctx, loss, self.perturb_eps,
                           keep_g=self.decouple or self.weight != 1.0)

    def _combine(self, ctx: StepContext, g: Any) -> None:
        if g is None:
            return
        g_p = ctx.grads()
        if not self.decouple:
            wsam_mix_(g_p, g, self.weight)
            return
        if not bool(torch.isfinite(_tree.global_norm(g_p))):
            return  # p.grad keeps the non-finite g_p, so the shell skips the step
        sharpness = torch._foreach_sub(g_p, g)
        if ctx.distributed and self.sync == "local":
            allreduce_mean(sharpness)  # every rank applies the same term
        ctx.set_grads(g)
        ctx.after = (list(ctx.params), sharpness)

    def _after_step(self, ctx: StepContext) -> None:
        pending = ctx.after
        if pending is None or self.weight == 0.0:
            return
        params, sharpness = pending
        lr_of = {id(p): float(g["lr"]) for g in self.param_groups for p in g["params"]}
        with torch.no_grad():
            for p, s in zip(params, sharpness):
                p.add_(s, alpha=-lr_of[id(p)] * self.weight)


# ---------------------------------------------------------------------- LookSAM
class LookSAM(SharpnessAware):
    """LookSAM (module docstring): SAM's gradient every ``k`` steps, its orthogonal part
    ``g_v`` reused in between.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        base: base optimizer class or instance.
        rho (float or Schedule): ascent radius >= 0 (default 0.05).
        k (int): a full SAM step every ``k`` steps, >= 1 (default 5, the paper's main setting).
        alpha (float): weight of the reused component, >= 0 (default 0.7, the paper's).
        layerwise (bool): projections and scales per tensor, as pytorch_optimizer (default
            False: over the whole vector, as the paper).
        perturb_eps (float): added to norms before dividing (default 1e-12).
        **kwargs: shell options and the base's keyword arguments.

    ``closure_calls`` is the number of closure calls of the *next* step: 2 when
    ``opt.steps % k == 0`` or no ``g_v`` is stored yet, else 1.
    """

    def __init__(self, params: Any, base: type[Optimizer] | Optimizer,
                 rho: float | Schedule = 0.05, k: int = 5, alpha: float = 0.7,
                 layerwise: bool = False, perturb_eps: float = 1e-12, **kwargs: Any) -> None:
        self.k = check_positive_int("k", k)
        self.alpha = check_nonnegative("alpha", alpha)
        if not isinstance(layerwise, bool):
            raise TypeError(f"layerwise must be a bool, got {layerwise!r}")
        self.layerwise = layerwise
        self.perturb_eps = check_nonnegative("perturb_eps", perturb_eps)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _has_component(self) -> bool:
        return any(LOOKSAM_KEY in self.state[p] for p in self._all_params() if p in self.state)

    def _full_next(self) -> bool:
        return self.k == 1 or self.steps % self.k == 0 or not self._has_component()

    def _closure_calls(self) -> int:
        return 2 if self._full_next() else 1

    def _descent(self, ctx: StepContext, closure: Any) -> torch.Tensor:
        full = self._full_next()
        loss = ctx.gradient(closure, first=True)
        g = ctx.grads()
        if full:
            saved = _sam_ascent(ctx, loss, self.perturb_eps, keep_g=self.k > 1)
            ctx.gradient(closure)
            ctx.restore()
            if saved is not None:
                g_p = ctx.grads()
                ctx.finite(None, _tree.global_norm(g_p))
                g_v = looksam_component(saved, g_p, layerwise=self.layerwise,
                                        eps=self.perturb_eps)
                ctx.stage_state(LOOKSAM_KEY, g_v)
            return loss
        ctx.finite(loss)
        if ctx.any_radius("rho") and self.alpha != 0.0:
            g_v = [self.state[p].get(LOOKSAM_KEY) if p in self.state else None
                   for p in ctx.params]
            g_v = [torch.zeros_like(p) if v is None else v for p, v in zip(ctx.params, g_v)]
            looksam_reuse_(g, g_v, alpha=self.alpha, layerwise=self.layerwise,
                           eps=self.perturb_eps)
        return loss


# ---------------------------------------------------------------------- FriendlySAM
class FriendlySAM(TwoPass):
    """Friendly SAM (module docstring): the EMA ``m`` of the gradients removed from the ascent.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``).
        base: base optimizer class or instance.
        rho (float or Schedule): ascent radius >= 0 (default 0.05).
        sigma (float): how much of ``m`` is removed, >= 0 (default 1.0, the paper's).
        lmbda (float): the EMA's weight on the past, in [0, 1] (default 0.9, the paper's).
        perturb_eps (float): added to the norm of the ascent direction (default 1e-12).
        **kwargs: shell options and the base's keyword arguments.
    """

    def __init__(self, params: Any, base: type[Optimizer] | Optimizer,
                 rho: float | Schedule = 0.05, sigma: float = 1.0, lmbda: float = 0.9,
                 perturb_eps: float = 1e-12, **kwargs: Any) -> None:
        self.sigma = check_nonnegative("sigma", sigma)
        self.lmbda = check_in_range("lmbda", lmbda, 0.0, 1.0, closed="[]")
        self.perturb_eps = check_nonnegative("perturb_eps", perturb_eps)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)

    def _ascend(self, ctx: StepContext, loss: torch.Tensor | None) -> Any:
        g = ctx.grads()
        if self.sigma == 0.0:
            ctx.perturb_(g, "rho", _ascent_scale(ctx, loss, g, self.perturb_eps))
            return None
        m = [self.state[p].get(FSAM_KEY) if p in self.state else None for p in ctx.params]
        m_new = fsam_ascent_(g, m, sigma=self.sigma, lmbda=self.lmbda)  # p.grad is now a;
        # the pass at the perturbed point replaces it (carried gradients are kept apart)
        ctx.perturb_(g, "rho", _ascent_scale(ctx, loss, g, self.perturb_eps))
        ctx.stage_state(FSAM_KEY, m_new)
        return None
