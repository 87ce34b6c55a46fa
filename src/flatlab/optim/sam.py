"""SAM, ASAM and unnormalized SAM: one class, two flags.

With the minibatch loss L, parameters theta (a list of tensors of any shapes, flattened into
one vector for the norms) and g = grad L(theta), one step is::

    e = rho * T^2 g / (||T g|| + eps)      normalize=True            (SAM / ASAM)
    e = rho * T^2 g                        normalize=False           (USAM / unnormalized ASAM)
    d = grad L(theta + e)                  gradient at the perturbed point
    theta <- base_step(theta, d)           the base optimizer (SGD, AdamW, ...) uses d

with T = I for SAM and T = diag(|theta| + eta) for ASAM (``adaptive=True``). The norm is the
global 2-norm over all parameters that have a gradient. The perturbation is undone by copying
theta back from a snapshot (one parameter-sized buffer, reused across steps), never by
subtracting e, so ``rho=0`` gives the base optimizer bit for bit.

Papers: SAM, Foret et al., ICLR 2021, arXiv 2010.01412. ASAM, Kwon et al., ICML 2021,
arXiv 2102.11600 (``eta`` as in the authors' code, default 0.01). Unnormalized SAM (USAM),
Andriushchenko & Flammarion, ICML 2022, arXiv 2206.06232, and the analysis of Agarwala &
Dauphin, "SAM operates far from home", ICML 2023.

Cost per step: 2 closure calls (``closure_calls == 2``), one base step, one persistent
parameter-sized buffer (the snapshot; ASAM also allocates two transient ones for T g and
T^2 g). All options of the shell (schedules, GradScaler, clipping, sync, state_dict) are in
:mod:`flatlab.optim.base`.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 1)
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = torch.nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> loss = opt.step(closure)     # loss at the unperturbed point
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from flatlab._checks import check_nonnegative
from flatlab.optim import _tree
from flatlab.optim.base import TwoPass
from flatlab.optim.schedules import Schedule

__all__ = ["SAM", "sam_direction"]


def sam_direction(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    adaptive: bool,
    eta: float,
    rescaled: Sequence[bool] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Return ``(T^2 g, ||T g||)``: the ascent direction before scaling and the norm that
    normalizes it (a 0-d tensor). ``T = I`` (the grads themselves are returned, not copied)
    unless ``adaptive``, where ``T_i = diag(|theta_i| + eta)`` for every tensor ``i`` with
    ``rescaled[i]`` (all when None) and ``T_i = I`` for the others."""
    if not adaptive:
        return list(grads), _tree.global_norm(grads)
    t = list(torch._foreach_abs(params))
    torch._foreach_add_(t, eta)
    if rescaled is not None:
        for i, keep in enumerate(rescaled):
            if not keep:
                t[i] = torch.ones_like(t[i])
    tg = torch._foreach_mul(t, grads)
    norm = _tree.global_norm(tg)
    torch._foreach_mul_(tg, t)
    return tg, norm


class SAM(TwoPass):
    """Sharpness-Aware Minimization; ``adaptive=True`` is ASAM, ``normalize=False`` is USAM.

    Args:
        params: parameters or parameter groups (a group may set its own ``rho``; 0 leaves the
            group unperturbed, e.g. BatchNorm and bias parameters).
        base: base optimizer class (built with ``**base_kwargs``) or instance.
        rho (float or Schedule): perturbation radius, >= 0 (default: 0.05).
        adaptive (bool): ASAM's scale-invariant perturbation (default: False).
        normalize (bool): divide by the gradient norm (default: True).
        eta (float): ASAM's offset in ``T = |theta| + eta`` (default: 0.01).
        adaptive_bias (bool): ASAM only: rescale biases too (default False, the authors' code,
            which rescales only parameters named ``weight``). Biases are the parameters named
            ``*.bias`` in ``model=`` when it is given, else the 1-D tensors (so then 1-D norm
            weights count as biases).
        perturb_eps (float): added to the norm so a zero gradient gives ``e = 0`` (default 1e-12).
        **kwargs: shell options (``sync``, ``model``, ``on_nonfinite``, ``grad_scaler``,
            ``clip_grad_norm``, ``descent_hook``; see :class:`SharpnessAware`) and the base's
            keyword arguments (``lr``, ``momentum``, ...).

    Raises:
        TypeError: rho/eta not a number, base not an optimizer.
        ValueError: rho, eta or perturb_eps negative or not finite.
    """

    def __init__(
        self,
        params: Any,
        base: type[Optimizer] | Optimizer,
        rho: float | Schedule = 0.05,
        adaptive: bool = False,
        normalize: bool = True,
        eta: float = 0.01,
        adaptive_bias: bool = False,
        perturb_eps: float = 1e-12,
        **kwargs: Any,
    ) -> None:
        for name, flag in (("adaptive", adaptive), ("normalize", normalize),
                           ("adaptive_bias", adaptive_bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        self.adaptive = adaptive
        self.normalize = normalize
        self.adaptive_bias = adaptive_bias
        self.eta = check_nonnegative("eta", eta)
        self.perturb_eps = check_nonnegative("perturb_eps", perturb_eps)
        super().__init__(params, base, radii={"rho": rho}, **kwargs)
        self._bias_ids: set[int] | None = None
        if self.model is not None:
            self._bias_ids = {
                id(p) for n, p in self.model.named_parameters() if n.split(".")[-1] == "bias"
            }

    def _rescaled(self, params: list[torch.Tensor]) -> list[bool] | None:
        if not self.adaptive or self.adaptive_bias:
            return None
        if self._bias_ids is not None:
            return [id(p) not in self._bias_ids for p in params]
        return [p.ndim != 1 for p in params]

    def _ascend(self, ctx: Any, loss: torch.Tensor | None) -> None:
        direction, norm = sam_direction(
            ctx.params, ctx.grads(), adaptive=self.adaptive, eta=self.eta,
            rescaled=self._rescaled(ctx.params),
        )
        (n,) = ctx.finite(loss, norm)
        ctx.perturb_(direction, "rho", 1.0 / (n + self.perturb_eps) if self.normalize else 1.0)
