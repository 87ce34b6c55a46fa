"""Sharpness measures of the full-data loss ``L`` at weights ``w``.

* Worst-case (SAM) sharpness (Foret et al. 2021, arXiv:2010.01412; adaptive: Kwon et al.
  2021, arXiv:2102.11600; recipe: Andriushchenko et al. 2023, arXiv:2302.07011):

      S_max = max_{||u||_p <= rho} L(w + c * u) - L(w),   c = 1, or c = |w| (adaptive),

  by projected normalized gradient ascent on ``u`` (``p = 2``: step along ``g / ||g||``, then
  rescale onto the ball; ``p = inf``: step along ``sign(g)``, then clip), started from the
  one-step SAM point ``rho g / ||g||`` (a random point of the sphere if ``g = 0``), step size
  ``2 rho`` halved whenever a step fails to raise the loss; the best point is kept. Near a
  minimum ``S_max ~ rho^2 lambda_max / 2`` (``p = 2``). ``batchwise=True`` gives
  m-sharpness: the maximum is taken per batch and the per-batch values are averaged.
* Average sharpness: ``E_eps[L(w + rho c * eps)] - L(w)``, ``eps ~ N(0, I)`` or ``U[-1, 1]``
  entrywise (not divided by ``sqrt(n)``); ``~ rho^2 tr(H) / 2`` for Gaussian noise near a
  minimum. Reported with its Monte-Carlo standard error.
* First-order flatness (GAM: Zhang et al. 2023, arXiv:2303.03108):
  ``R_rho = rho * max_{||d||_2 <= rho} ||grad L(w + d)||``, by ascent along
  ``grad(1/2 ||grad L||^2) = H grad L`` (one Hessian-vector product per step); at a minimum of
  a quadratic it is ``rho^2 lambda_max``.
* ``gradient_norm``: ``||grad L(w)||_p``.
* ``domain_sharpness``: a measure on each domain's loss, their mean and max, and the same
  measure on the pooled (size-weighted) loss.

Evaluations are functional (the model is never modified) and in eval mode by default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flatlab._batches import batches
from flatlab._checks import check_choice, check_nonnegative, check_positive_int
from flatlab._ranks import Ranks, ranks_of
from flatlab.curvature._model import (
    FunctionalLoss,
    flatten,
    mean_loss_and_grad,
    measured_model,
    measurement_mode,
    resolve_params,
    unflatten,
)
from flatlab.curvature._progress import Meter


@dataclass(frozen=True)
class SharpnessResult:
    """A sharpness measurement.

    Attributes:
        value: the measure (loss increase, ``rho * gradient norm``, or the gradient norm).
        loss: ``L(w)``.
        perturbed_loss: loss at the maximizer (mean perturbed loss for average sharpness).
        stderr: Monte-Carlo standard error (average sharpness), else ``None``.
        n_evals: full-data loss / gradient evaluations used (Hessian-vector products
            included, for first-order flatness).
        measure: which measure; rho: the radius.
        converged: the planned steps / samples all ran (``False``: a budget ended the
            measurement, and the best point or the samples so far are reported).
    """

    value: float
    loss: float
    perturbed_loss: float
    stderr: float | None
    n_evals: int
    measure: str
    rho: float
    converged: bool = True


@dataclass(frozen=True)
class DomainSharpnessResult:
    """Per-domain and pooled sharpness; ``value`` is the mean over domains."""

    per_domain: dict[str, float]
    mean: float
    max: float
    pooled: float
    measure: str
    rho: float
    details: dict[str, SharpnessResult] = field(repr=False, default_factory=dict)

    @property
    def value(self) -> float:
        """Mean of the per-domain sharpness values."""
        return self.mean

    @property
    def ratio(self) -> float:
        """Mean per-domain sharpness over pooled sharpness."""
        return self.mean / self.pooled

    @property
    def converged(self) -> bool:
        """Every per-domain measurement ran to the end (budgets apply to each)."""
        return all(r.converged for r in self.details.values())


class _Ball:
    """The loss at ``w + c * u`` for the selected parameters, as a function of flat ``u``."""

    def __init__(self, model, loss_fn, data, params, adaptive: bool, meter: Meter | None = None,
                 ranks: Ranks | None = None):
        model = measured_model(model)
        names, tensors = resolve_params(model, params)
        self.meter, self.ranks = meter, ranks
        self.floss = FunctionalLoss(model, loss_fn, names)
        self.data = data
        self.w = [t.detach() for t in tensors]
        self.c = flatten([w.abs() for w in self.w]) if adaptive else None
        self.n = sum(w.numel() for w in self.w)
        self.evals = 0
        if ranks is not None:
            ranks.check_same("the measured parameters", flatten(self.w),
                             "broadcast the model from rank 0 before measuring")

    def point(self, u: torch.Tensor) -> list[torch.Tensor]:
        step = u if self.c is None else self.c * u
        return [w + d for w, d in zip(self.w, unflatten(step, self.w))]

    def loss(self, u: torch.Tensor) -> float:
        self.evals += 1
        if self.meter is not None:
            self.meter.update(1)
        return float(mean_loss_and_grad(self.floss, self.point(u), self.data, grad=False,
                                        ranks=self.ranks)[0])

    def loss_grad(self, u: torch.Tensor) -> tuple[float, torch.Tensor]:
        self.evals += 1
        if self.meter is not None:
            self.meter.update(1)
        loss, g = mean_loss_and_grad(self.floss, self.point(u), self.data, ranks=self.ranks)
        g = flatten(g)
        return float(loss), g if self.c is None else self.c * g


def _direction(g: torch.Tensor, norm: str) -> torch.Tensor | None:
    if norm == "linf":
        return torch.sign(g) if bool((g != 0).any()) else None
    gn = g.norm()
    return g / gn if gn > 0 else None


def _project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return u.clamp(-rho, rho)
    un = float(u.norm())
    return u if un <= rho else u * (rho / un)


def _random_direction(n, norm, gen, like) -> torch.Tensor:
    r = torch.randn(n, generator=gen, dtype=torch.float64).to(like)
    return torch.sign(r) if norm == "linf" else r / r.norm()


def _check_common(rho, norm, steps):
    rho = check_nonnegative("rho", rho)
    norm = check_choice("norm", norm, ("l2", "linf"))
    steps = check_positive_int("steps", steps)
    return rho, norm, steps


def _ascend(objective, zero: torch.Tensor, rho: float, norm: str, steps: int, seed: int,
            exhausted) -> tuple[float, float]:
    """Projected ascent with step halving on ``{||u||_p <= rho}``: ``(f(0), best f found)``.

    ``objective(u)`` returns ``(f(u), a(u))`` with ``a`` an ascent direction of ``f`` at ``u``
    (its gradient up to a positive factor; the direction used is ``a / ||a||`` for ``l2`` and
    ``sign(a)`` for ``linf``). The ascent starts on the boundary along ``a(0)`` (a seeded
    random direction when ``a(0)`` vanishes), then tries ``u + lr d`` projected back into the
    ball, starting at ``lr = 2 rho``: an improving candidate is taken, otherwise ``lr`` halves.
    It evaluates ``objective`` at most ``steps + 1`` times and stops early when ``a``
    vanishes or ``exhausted()`` (a budget) says so. Shapes: ``u``, ``a``: ``(n,)``.
    """
    value0, a = objective(zero)
    if rho == 0:
        return value0, value0
    d = _direction(a, norm)
    if d is None:
        d = _random_direction(zero.numel(), norm, torch.Generator().manual_seed(seed), zero)
    u = _project(rho * d, rho, norm)
    best, a = objective(u)
    lr = 2 * rho
    for _ in range(steps - 1):
        d = _direction(a, norm)
        if d is None or exhausted():
            break
        cand = _project(u + lr * d, rho, norm)
        value, a_cand = objective(cand)
        if value > best:
            u, best, a = cand, value, a_cand
        else:
            lr /= 2
    return value0, best


def _worst_case(ball: _Ball, rho: float, norm: str, steps: int, seed: int):
    """``(L(w), max found L(w + c u))``: :func:`_ascend` on the loss."""
    zero = torch.zeros(ball.n, dtype=ball.w[0].dtype, device=ball.w[0].device)
    return _ascend(ball.loss_grad, zero, rho, norm, steps, seed,
                   lambda: ball.meter is not None and ball.meter.exhausted)


def worst_case_sharpness(
    model: torch.nn.Module,
    loss_fn: Any,
    data: Any,
    rho: float,
    *,
    adaptive: bool = False,
    norm: str = "l2",
    steps: int = 20,
    batchwise: bool = False,
    params: Any = None,
    eval_mode: bool = True,
    seed: int = 0,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    progress: Any = True,
    distributed: Any = False,
) -> SharpnessResult:
    """``max_{||u||_p <= rho} L(w + c u) - L(w)`` by projected gradient ascent.

    Args:
        rho: radius (``c * u`` is the perturbation; ``c = |w|`` if ``adaptive``).
        norm: ``"l2"`` or ``"linf"``.
        steps: gradient evaluations of the ascent (each a full pass over the data), after
            the one at ``w``.
        batchwise: m-sharpness: maximize per batch of ``data`` and average (size-weighted).
        params, eval_mode: as for :func:`~flatlab.curvature.hessian_operator`.
        seed: seed of the start direction when the gradient vanishes.
        max_matvecs, max_seconds: budgets in full-data evaluations and seconds; when one
            ends, the best point so far is reported with ``converged=False``.
        progress: a progress bar on stderr when it is a terminal (``False``: never).
        distributed: ``True`` or a process group: every rank passes its own shard of the
            data, and every loss and gradient is the full-data one, summed over the ranks
            (see :func:`~flatlab.curvature.hessian_operator`). With ``batchwise``, every
            rank's batches are ascended on their own and the size-weighted mean runs over
            all the ranks' batches.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> x, y = torch.randn(16, 2), torch.randn(16, 1)
        >>> s = worst_case_sharpness(net, torch.nn.functional.mse_loss, (x, y), rho=0.05)
        >>> s.value >= 0
        True
    """
    rho, norm, steps = _check_common(rho, norm, steps)
    ranks = ranks_of(distributed)
    groups = [[(x, y)] for x, y, _ in batches(data)] if batchwise else [data]
    total = base_sum = pert_sum = 0.0
    count, evals = 0, 0
    local = None if batchwise else ranks  # a batch's ascent needs no other rank
    meter = Meter("worst-case sharpness", len(groups) * (steps + 1), max_matvecs=max_matvecs,
                  max_seconds=max_seconds, progress=progress, unit="evaluations", ranks=local)
    with measurement_mode(model, eval_mode), meter:
        for group in groups:
            if count and meter.exhausted:
                break
            ball = _Ball(model, loss_fn, group if batchwise else data, params, adaptive, meter,
                         local)
            base, best = _worst_case(ball, rho, norm, steps, seed)
            n = sum(b[0].shape[0] for b in group) if batchwise else 1
            total += n * (best - base)
            base_sum += n * base
            pert_sum += n * best
            count += n
            evals += ball.evals
    stopped = meter.stopped
    if batchwise and ranks is not None:  # the mean over every rank's batches
        sums = ranks.sum(torch.tensor([total, base_sum, pert_sum, count, evals, stopped],
                                      dtype=torch.float64, device=ranks.device))
        total, base_sum, pert_sum, count, evals, stopped = sums.tolist()
        evals, stopped = int(evals), stopped > 0
    name = ("adaptive_" if adaptive else "") + f"worst_case_{norm}" + ("_m" if batchwise else "")
    return SharpnessResult(total / count, base_sum / count, pert_sum / count, None, evals, name,
                           rho, not stopped)


def average_sharpness(
    model: torch.nn.Module,
    loss_fn: Any,
    data: Any,
    rho: float,
    *,
    samples: int = 100,
    adaptive: bool = False,
    noise: str = "gaussian",
    params: Any = None,
    eval_mode: bool = True,
    seed: int = 0,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    progress: Any = True,
    distributed: Any = False,
) -> SharpnessResult:
    """``E[L(w + rho c eps)] - L(w)`` over ``samples`` draws of ``eps`` (Gaussian or uniform).

    ``max_matvecs`` (loss evaluations) and ``max_seconds`` are budgets: when one ends, the
    mean over the samples so far is reported with ``converged=False``; ``progress`` and
    ``distributed`` as for :func:`worst_case_sharpness` (the draws are the same on every
    rank).
    """
    rho = check_nonnegative("rho", rho)
    samples = check_positive_int("samples", samples)
    noise = check_choice("noise", noise, ("gaussian", "uniform"))
    ranks = ranks_of(distributed)
    gen = torch.Generator().manual_seed(int(seed))
    meter = Meter("average sharpness", samples + 1, max_matvecs=max_matvecs,
                  max_seconds=max_seconds, progress=progress, unit="evaluations", ranks=ranks)
    with measurement_mode(model, eval_mode), meter:
        ball = _Ball(model, loss_fn, data, params, adaptive, meter, ranks)
        zero = torch.zeros(ball.n, dtype=ball.w[0].dtype, device=ball.w[0].device)
        base = ball.loss(zero)
        values = []
        for _ in range(samples):
            if values and meter.exhausted:
                break
            if noise == "gaussian":
                eps = torch.randn(ball.n, generator=gen, dtype=torch.float64)
            else:
                eps = torch.rand(ball.n, generator=gen, dtype=torch.float64) * 2 - 1
            values.append(ball.loss(rho * eps.to(zero)) - base)
    v = torch.tensor(values, dtype=torch.float64)
    stderr = float(v.std() / len(values)**0.5) if len(values) > 1 else float("inf")
    name = ("adaptive_" if adaptive else "") + f"average_{noise}"
    return SharpnessResult(float(v.mean()), base, base + float(v.mean()), stderr, ball.evals,
                           name, rho, len(values) == samples)


def first_order_flatness(
    model: torch.nn.Module,
    loss_fn: Any,
    data: Any,
    rho: float,
    *,
    steps: int = 20,
    params: Any = None,
    eval_mode: bool = True,
    seed: int = 0,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    progress: Any = True,
    distributed: Any = False,
) -> SharpnessResult:
    """GAM's ``rho * max_{||d|| <= rho} ||grad L(w + d)||`` by ascent along ``H grad L``.

    Each step is a gradient and a Hessian-vector product (two evaluations of the budget
    ``max_matvecs``); when a budget ends, the best point so far is reported with
    ``converged=False``. ``distributed`` as for :func:`worst_case_sharpness`.
    """
    from flatlab.curvature.hvp import HessianOperator

    rho, _, steps = _check_common(rho, "l2", steps)
    ranks = ranks_of(distributed)
    meter = Meter("first-order flatness", 2 * steps + 3, max_matvecs=max_matvecs,
                  max_seconds=max_seconds, progress=progress, unit="evaluations", ranks=ranks)
    with measurement_mode(model, eval_mode), meter:
        ball = _Ball(model, loss_fn, data, params, adaptive=False, meter=meter, ranks=ranks)
        op = HessianOperator(model, loss_fn, data, params, eval_mode, distributed=ranks)

        def norm_and_ascent(u):
            _, g = ball.loss_grad(u)
            meter.update(1)  # the product below
            return float(g.norm()), op.matvec_at(ball.point(u), g)

        zero = torch.zeros(ball.n, dtype=ball.w[0].dtype, device=ball.w[0].device)
        base_loss = ball.loss(zero)
        gnorm0, best = _ascend(norm_and_ascent, zero, rho, "l2", steps, seed,
                               lambda: meter.exhausted)
        best = max(best, gnorm0)
    return SharpnessResult(rho * best, base_loss, base_loss, None, ball.evals + op.n_matvecs,
                           "first_order_flatness", rho, not meter.stopped)


def gradient_norm(
    model: torch.nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    p: float = 2.0,
    params: Any = None,
    eval_mode: bool = True,
    distributed: Any = False,
) -> SharpnessResult:
    """``||grad L(w)||_p`` of the full-data loss (``rho`` is reported as 0; ``distributed``
    as for :func:`worst_case_sharpness`)."""
    with measurement_mode(model, eval_mode):
        ball = _Ball(model, loss_fn, data, params, adaptive=False, ranks=ranks_of(distributed))
        zero = torch.zeros(ball.n, dtype=ball.w[0].dtype, device=ball.w[0].device)
        loss, g = ball.loss_grad(zero)
    value = float(torch.linalg.vector_norm(g, ord=p))
    return SharpnessResult(value, loss, loss, None, ball.evals, f"gradient_norm_l{p:g}", 0.0)


_MEASURES = {
    "worst_case": worst_case_sharpness,
    "average": average_sharpness,
    "first_order": first_order_flatness,
}


def domain_sharpness(
    model: torch.nn.Module,
    loss_fn: Any,
    domains: Mapping[str, Any] | list[Any],
    rho: float,
    *,
    measure: str = "worst_case",
    **kwargs: Any,
) -> DomainSharpnessResult:
    """Sharpness of each domain's loss, their mean and max, and that of the pooled loss.

    Args:
        domains: ``{name: data}`` or a list of data (named ``"0"``, ``"1"``, ...); each data
            is a tensor pair, list of pairs or DataLoader. The pooled loss weights every
            example equally (domains by their size).
        measure: ``"worst_case"``, ``"average"`` or ``"first_order"``; ``kwargs`` go to it.

    Raises:
        ValueError: no domain, or a bad ``measure``.
    """
    measure = check_choice("measure", measure, tuple(_MEASURES))
    named = dict(domains) if isinstance(domains, Mapping) else {
        str(i): d for i, d in enumerate(domains)}
    if not named:
        raise ValueError("domains must hold at least one domain, got none")
    fn = _MEASURES[measure]
    details = {name: fn(model, loss_fn, d, rho, **kwargs) for name, d in named.items()}
    pooled_data = [(x, y) for d in named.values() for x, y, _ in batches(d)]
    pooled = fn(model, loss_fn, pooled_data, rho, **kwargs)
    per = {name: r.value for name, r in details.items()}
    values = list(per.values())
    return DomainSharpnessResult(per, sum(values) / len(values), max(values), pooled.value,
                                 measure, float(rho), details)
