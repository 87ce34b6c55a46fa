r"""Batched Euler-Maruyama: many paths of an optimizer SDE at once, statistics every k steps.

For ``dY = b(t, Y) dt + s(t, Y) dW`` the scheme is
``Y_{n+1} = Y_n + b(t_n, Y_n) dt + s(t_n, Y_n) sqrt(dt) z_n`` with ``z_n ~ N(0, I)``
(weak order 1, strong order 1/2; Kloeden & Platen 1992, ch. 9 and 14). All ``paths`` copies
advance together as rows of ``(paths, d)`` tensors, on whatever device ``x0`` lives (CPU or
GPU). Only the current state is kept: every ``record_every`` steps a ``statistics`` function
reduces it (and the per-path loss) to a few numbers, so memory does not grow with the number
of steps or paths beyond one state. Randomness comes from one seeded ``torch.Generator``.

The time of step ``n`` is ``n dt``; the SDEs of :mod:`flatlab.sde.models` use ``t = k lr``,
so ``dt = lr`` (the default) puts SDE step ``n`` next to optimizer step ``n``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flatlab._checks import check_positive, check_positive_int
from flatlab.sde.models import OptimizerSDE

__all__ = [
    "Trajectory", "default_statistics", "grouped_loss_statistics", "simulate", "initial_points",
]

Statistics = Callable[[tuple[torch.Tensor, ...], torch.Tensor], dict[str, torch.Tensor]]


def default_statistics(
    state: tuple[torch.Tensor, ...], loss: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Mean, standard deviation and median of the loss over paths ``(scalars)``; mean and
    variance of the iterate per coordinate ``(d,)``."""
    x = state[0]
    return {
        "loss_mean": loss.mean(),
        "loss_std": loss.std() if loss.numel() > 1 else torch.zeros_like(loss.mean()),
        "loss_median": loss.median(),
        "x_mean": x.mean(0),
        "x_var": x.var(0) if x.shape[0] > 1 else torch.zeros_like(x[0]),
    }


def grouped_loss_statistics(eigenvalues: torch.Tensor, groups: int) -> Statistics:
    """Statistics of a diagonal quadratic whose ``d = groups * k`` coordinates form ``groups``
    consecutive blocks of ``k``: adds ``group_loss`` ``(groups,)``, the mean over paths of
    ``0.5 sum_{i in block} lambda_i x_i^2``, to :func:`default_statistics`.

    Coordinates of a diagonal quadratic under an elementwise optimizer (SGD, SignSGD,
    RMSpropW, AdamW) with independent noise evolve independently, so one run with a different
    noise level per block measures several noise levels at once.
    """
    lam = torch.as_tensor(eigenvalues)
    if lam.dim() != 1 or lam.shape[0] % groups != 0:
        raise ValueError(f"eigenvalues must be 1-D with a length divisible by groups={groups}, "
                         f"got shape {tuple(lam.shape)}")

    def statistics(state: tuple[torch.Tensor, ...], loss: torch.Tensor) -> dict[str, torch.Tensor]:
        x = state[0]
        per_coord = 0.5 * lam.to(x) * (x * x).mean(0)
        return {**default_statistics(state, loss), "group_loss": per_coord.view(groups, -1).sum(1)}

    return statistics


@dataclass(frozen=True)
class Trajectory:
    """Recorded statistics of a batch of paths.

    Attributes:
        times: ``(n_records,)`` times ``step * dt``.
        steps: ``(n_records,)`` step indices (0, k, 2k, ..., last).
        stats: name -> tensor ``(n_records, ...)`` stacked over records.
        final_state: the state tuple after the last step (``(paths, d)`` each).
    """

    times: torch.Tensor
    steps: torch.Tensor
    stats: dict[str, torch.Tensor]
    final_state: tuple[torch.Tensor, ...] = field(repr=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.stats[name]

    def tail_mean(self, name: str = "loss_mean", fraction: float = 0.25) -> float:
        """Time average of ``stats[name]`` over the last ``fraction`` of the records."""
        values = self.stats[name]
        n = max(1, int(round(values.shape[0] * fraction)))
        return float(values[-n:].mean())


def initial_points(x0: torch.Tensor, paths: int | None, dim: int) -> torch.Tensor:
    """``x0`` of shape ``(d,)`` repeated ``paths`` times, or ``(paths, d)`` as given."""
    if x0.dim() == 1:
        if paths is None:
            raise ValueError("paths must be given when x0 has shape (d,), got None")
        x0 = x0.unsqueeze(0).expand(check_positive_int("paths", paths), -1)
    elif x0.dim() != 2 or (paths is not None and x0.shape[0] != paths):
        raise ValueError(f"x0 must have shape (d,) or (paths, d), got {tuple(x0.shape)}")
    if x0.shape[1] != dim:
        raise ValueError(f"x0 must have dimension {dim} (the objective's), got {x0.shape[1]}")
    return x0.clone()


def simulate(
    sde: OptimizerSDE,
    x0: torch.Tensor,
    steps: int,
    *,
    paths: int | None = None,
    dt: float | None = None,
    record_every: int = 1,
    statistics: Statistics = default_statistics,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> Trajectory:
    """Integrate ``sde`` from ``x0`` for ``steps`` Euler-Maruyama steps of size ``dt``.

    Args:
        sde: an :class:`~flatlab.sde.models.OptimizerSDE`.
        x0: initial iterate ``(d,)`` (with ``paths``) or ``(paths, d)``; its dtype and device
            are the simulation's.
        steps: number of steps (>= 1).
        paths: number of paths when ``x0`` is ``(d,)``.
        dt: step size; defaults to ``sde.lr`` (one SDE step per optimizer step).
        record_every: record statistics at steps ``0, k, 2k, ...`` and at the last step.
        statistics: ``(state, loss) -> {name: tensor}``, reduced over paths.
        generator: random source; or ``seed`` to create one on ``x0``'s device.

    Returns:
        a :class:`Trajectory`.

    Raises:
        ValueError: non-positive ``steps``/``dt``/``record_every``, or ``x0`` of the wrong shape.
    """
    steps = check_positive_int("steps", steps)
    record_every = check_positive_int("record_every", record_every)
    dt = sde.lr if dt is None else check_positive("dt", dt)
    x = initial_points(x0, paths, sde.dim)
    if generator is None:
        generator = torch.Generator(device=x.device)
        if seed is not None:
            generator.manual_seed(seed)
    state = sde.initial_state(x)
    n_paths, noise_dim = x.shape[0], sde.noise_dim()
    records: list[dict[str, torch.Tensor]] = []
    kept: list[int] = []

    def record(n: int) -> None:
        stats = statistics(state, sde.objective.loss(state[0]))
        records.append({k: v.detach() for k, v in stats.items()})
        kept.append(n)

    with torch.no_grad():
        record(0)
        for n in range(steps):
            z = torch.randn(n_paths, noise_dim, generator=generator, dtype=x.dtype, device=x.device)
            state = sde.step(n * dt, dt, state, z)
            if (n + 1) % record_every == 0 or n + 1 == steps:
                record(n + 1)
    return _stack(records, kept, dt, state)


def _stack(records, kept, dt, state) -> Trajectory:
    steps_t = torch.tensor(kept)
    stats = {k: torch.stack([r[k] for r in records]).cpu() for k in records[0]}
    return Trajectory(steps_t.to(torch.float64) * dt, steps_t, stats, tuple(state))
