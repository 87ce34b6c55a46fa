r"""Discrete optimizer against its SDE, on many independent copies at once.

An elementwise optimizer (SGD, SignSGD, RMSpropW, AdamW) applied to one parameter ``X`` of
shape ``(paths, d)`` whose gradient row ``i`` is ``grad f(X_i) + Z_i`` *is* ``paths``
independent runs, so the discrete side costs one optimizer step per step, like the SDE side.
Both sides see the same objective (:mod:`flatlab.sde.objectives`: a quadratic, or a small
network's full-batch loss as a function of its flattened parameters) and the same noise model
(injected noise, as in Compagnoni et al., ICLR 2025, arXiv 2411.15958, Sec. 3 experiments).

Step ``k`` of the optimizer is matched with time ``t = k lr`` of the SDE, integrated with
``substeps`` Euler-Maruyama steps per optimizer step (``dt = lr / substeps``). The report is
the relative gap of the mean-loss trajectories,
``gap(t) = |E L_sde(t) - E L_opt(t)| / E L_opt(t)`` at the recorded times ``t > 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flatlab._checks import check_positive_int
from flatlab.sde.integrate import (
    Statistics,
    Trajectory,
    _stack,
    default_statistics,
    initial_points,
    simulate,
)
from flatlab.sde.models import SGDSDE, AdamWSDE, OptimizerSDE, RMSpropWSDE, SignSGDSDE
from flatlab.sde.noise import _Noise
from flatlab.sde.objectives import Objective

__all__ = ["Comparison", "run_optimizer", "optimizer_for", "compare"]

OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


def run_optimizer(
    make_optimizer: OptimizerFactory,
    objective: Objective,
    noise: _Noise,
    x0: torch.Tensor,
    steps: int,
    *,
    lr: float,
    paths: int | None = None,
    record_every: int = 1,
    statistics: Statistics = default_statistics,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Trajectory:
    """Run ``make_optimizer([X])`` for ``steps`` steps with gradients ``grad f(X) + Z``.

    Args:
        make_optimizer: builds an optimizer over a list holding the one ``(paths, d)`` tensor,
            e.g. ``lambda p: torch.optim.SGD(p, lr=0.01)``.
        objective, noise: the loss and the injected gradient noise.
        x0: ``(d,)`` (with ``paths``) or ``(paths, d)``.
        lr: the learning rate, used only for the time axis ``t = k lr``.
        record_every, statistics, generator, seed: as in :func:`flatlab.sde.simulate`.

    Returns:
        a :class:`~flatlab.sde.Trajectory` with ``times = steps * lr``.
    """
    steps = check_positive_int("steps", steps)
    record_every = check_positive_int("record_every", record_every)
    noise.check_dim(objective.dim)
    x = initial_points(x0, paths, objective.dim)
    if generator is None:
        generator = torch.Generator(device=x.device)
        if seed is not None:
            generator.manual_seed(seed)
    opt = make_optimizer([x])
    n_paths, d = x.shape
    records: list[dict[str, torch.Tensor]] = []
    kept: list[int] = []

    def record(n: int) -> None:
        records.append({k: v.detach() for k, v in statistics((x,), objective.loss(x)).items()})
        kept.append(n)

    with torch.no_grad():
        record(0)
        for n in range(steps):
            x.grad = objective.grad(x) + noise.sample(
                n_paths, d, generator=generator, dtype=x.dtype, device=x.device)
            opt.step()
            if (n + 1) % record_every == 0 or n + 1 == steps:
                record(n + 1)
    return _stack(records, kept, lr, (x.detach(),))


def optimizer_for(sde: OptimizerSDE) -> OptimizerFactory:
    """The discrete optimizer whose SDE ``sde`` is, with the same hyperparameters.

    SGD and AdamW are torch's; SignSGD and RMSpropW are :mod:`flatlab.optim`'s.
    """
    from flatlab.optim import RMSpropW, SignSGD

    if isinstance(sde, SGDSDE):
        return lambda p: torch.optim.SGD(p, lr=sde.lr)
    if isinstance(sde, SignSGDSDE):
        return lambda p: SignSGD(p, lr=sde.lr, weight_decay=sde.weight_decay)
    if isinstance(sde, RMSpropWSDE):
        return lambda p: RMSpropW(p, lr=sde.lr, beta=sde.beta, eps=sde.eps,
                                  weight_decay=sde.weight_decay)
    if isinstance(sde, AdamWSDE):
        if not sde.bias_correction:
            raise ValueError(
                "sde.bias_correction must be True to match torch.optim.AdamW, got False")
        return lambda p: torch.optim.AdamW(p, lr=sde.lr, betas=sde.betas, eps=sde.eps,
                                           weight_decay=sde.weight_decay)
    raise TypeError(f"sde must be one of flatlab.sde's optimizer SDEs, got {type(sde).__name__}")


@dataclass(frozen=True)
class Comparison:
    """SDE and discrete trajectories on the same records, with their relative loss gap.

    Attributes:
        sde, discrete: the two :class:`~flatlab.sde.Trajectory` (same ``times``).
        gap: ``(n_records - 1,)`` relative gap of the mean losses at the times ``t > 0``.
        mean_gap, max_gap: its mean and maximum.
    """

    sde: Trajectory
    discrete: Trajectory
    gap: torch.Tensor
    mean_gap: float
    max_gap: float


def compare(
    sde: OptimizerSDE,
    x0: torch.Tensor,
    steps: int,
    *,
    paths: int | None = None,
    substeps: int = 1,
    record_every: int = 1,
    make_optimizer: OptimizerFactory | None = None,
    statistics: Statistics = default_statistics,
    seed: int = 0,
) -> Comparison:
    """Simulate ``sde`` and run its discrete optimizer for ``steps`` optimizer steps.

    Args:
        sde: the SDE; its objective, noise and lr are shared with the optimizer.
        x0: ``(d,)`` with ``paths``, or ``(paths, d)``.
        steps: optimizer steps; the SDE takes ``steps * substeps`` steps of ``lr / substeps``.
        substeps: Euler-Maruyama steps per optimizer step (>= 1).
        record_every: record every that many optimizer steps.
        make_optimizer: defaults to :func:`optimizer_for`.
        seed: the SDE uses ``seed``, the optimizer ``seed + 1`` (independent noise).

    Returns:
        a :class:`Comparison`.
    """
    substeps = check_positive_int("substeps", substeps)
    steps = check_positive_int("steps", steps)
    make_optimizer = optimizer_for(sde) if make_optimizer is None else make_optimizer
    disc = run_optimizer(make_optimizer, sde.objective, sde.noise, x0, steps, lr=sde.lr,
                         paths=paths, record_every=record_every, statistics=statistics,
                         seed=seed + 1)
    cont = simulate(sde, x0, steps * substeps, paths=paths, dt=sde.lr / substeps,
                    record_every=record_every * substeps, statistics=statistics, seed=seed)
    a, b = cont.stats["loss_mean"][1:], disc.stats["loss_mean"][1:]
    gap = (a - b).abs() / b.abs().clamp_min(torch.finfo(b.dtype).tiny)
    return Comparison(cont, disc, gap, float(gap.mean()), float(gap.max()))
