"""Filter-normalized 1-D and 2-D slices of the loss surface (Li et al. 2018, arXiv:1712.09913).

A random direction ``d`` has the shapes of the selected parameters; entries are Gaussian.
Filter normalization rescales every filter (slice ``i`` along dim 0 of a weight with
``dim >= 2``: a row of a Linear weight, an output channel of a convolution) to the norm of
the same filter of the weights:

    d_i <- d_i * ||w_i|| / ||d_i||.

Parameters with ``dim <= 1`` (biases, normalization scales) get a zero direction by default
(``ignore_1d=True``, the paper's ``biasbn`` choice) or are normalized as one filter. The
slice is ``f(a) = L(w + a d)`` on a grid of ``a`` (1-D) or ``f(a, b) = L(w + a d1 + b d2)``
(2-D), the full-data loss in eval mode, the model untouched.

Shapes: ``alphas (points,)``, ``betas (points,)`` or ``None``, ``losses (points,)`` or
``(points, points)`` indexed ``[i_alpha, i_beta]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flatlab._checks import check_positive, check_positive_int
from flatlab._ranks import ranks_of
from flatlab.curvature._model import (
    FunctionalLoss,
    flatten,
    mean_loss_and_grad,
    measured_model,
    measurement_mode,
    resolve_params,
)


@dataclass(frozen=True)
class LandscapeResult:
    """A loss slice: ``losses`` on the grid ``alphas`` (x ``betas`` for 2-D)."""

    alphas: torch.Tensor
    betas: torch.Tensor | None
    losses: torch.Tensor
    directions: tuple[list[torch.Tensor], ...]

    @property
    def value(self) -> float:
        """Loss at the centre of the grid (``a = b = 0`` when the span is symmetric)."""
        mid = self.alphas.numel() // 2
        return float(self.losses[mid] if self.betas is None else self.losses[mid, mid])


def filter_normalized_direction(
    tensors: list[torch.Tensor], *, generator: torch.Generator, ignore_1d: bool = True
) -> list[torch.Tensor]:
    """A Gaussian direction with each filter rescaled to its weight's filter norm."""
    out = []
    for w in tensors:
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
        if w.dim() <= 1:
            if ignore_1d:
                d = torch.zeros_like(w)
            else:
                d = d * (w.norm() / d.norm().clamp_min(1e-30))
        else:
            dims = tuple(range(1, w.dim()))
            wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
            dn = torch.linalg.vector_norm(d, dim=dims, keepdim=True).clamp_min(1e-30)
            d = d * (wn / dn)
        out.append(d)
    return out


def loss_landscape(
    model: torch.nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    dims: int = 1,
    span: float = 1.0,
    points: int = 21,
    directions: tuple[list[torch.Tensor], ...] | None = None,
    ignore_1d: bool = True,
    params: Any = None,
    eval_mode: bool = True,
    seed: int = 0,
    distributed: Any = False,
) -> LandscapeResult:
    """Loss on a 1-D line or 2-D plane through the weights along filter-normalized directions.

    Args:
        dims: 1 or 2.
        span: the grid covers ``[-span, span]`` in each coordinate.
        points: grid points per coordinate.
        directions: your own directions (lists shaped like the selected parameters);
            random filter-normalized ones by default (seeded: the same on every rank).
        distributed: ``True`` or a process group: every rank passes its own shard of the
            data and every loss is the full-data one (see
            :func:`~flatlab.curvature.hessian_operator`).

    Raises:
        ValueError: ``dims`` not 1 or 2, or directions of the wrong number or shapes.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    span = check_positive("span", span)
    points = check_positive_int("points", points)
    ranks = ranks_of(distributed)
    model = measured_model(model)
    names, tensors = resolve_params(model, params)
    w = [t.detach() for t in tensors]
    if directions is None:
        gen = torch.Generator().manual_seed(int(seed))
        directions = tuple(filter_normalized_direction(w, generator=gen, ignore_1d=ignore_1d)
                           for _ in range(dims))
    if len(directions) != dims or any(
        len(d) != len(w) or any(a.shape != b.shape for a, b in zip(d, w)) for d in directions
    ):
        raise ValueError(f"directions must be {dims} lists shaped like the selected parameters")
    if ranks is not None:
        ranks.check_same("the parameters and directions", flatten(w + [
            t for d in directions for t in d]), "broadcast the model (and your directions)")
    floss = FunctionalLoss(model, loss_fn, names)
    grid = torch.linspace(-span, span, points, dtype=torch.float64)

    def at(a: float, b: float) -> float:
        point = [wi + a * d1 for wi, d1 in zip(w, directions[0])]
        if dims == 2:
            point = [p + b * d2 for p, d2 in zip(point, directions[1])]
        return float(mean_loss_and_grad(floss, point, data, grad=False, ranks=ranks)[0])

    with measurement_mode(model, eval_mode):
        if dims == 1:
            losses = torch.tensor([at(float(a), 0.0) for a in grid], dtype=torch.float64)
            return LandscapeResult(grid, None, losses, tuple(directions))
        losses = torch.tensor([[at(float(a), float(b)) for b in grid] for a in grid],
                              dtype=torch.float64)
    return LandscapeResult(grid, grid.clone(), losses, tuple(directions))


def plot_landscape(result: LandscapeResult, ax: Any = None, path: str | None = None) -> Any:
    """Plot a slice (line for 1-D, contours for 2-D) with matplotlib; save to ``path`` if given.

    Returns the matplotlib Axes. matplotlib is imported only here.
    """
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
    if result.betas is None:
        ax.plot(result.alphas.numpy(), result.losses.numpy())
        ax.set_xlabel("alpha (filter-normalized direction)")
        ax.set_ylabel("loss")
    else:
        cs = ax.contour(result.alphas.numpy(), result.betas.numpy(), result.losses.T.numpy(),
                        levels=20)
        ax.clabel(cs, inline=True, fontsize=6)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
    if path is not None:
        (fig or ax.figure).savefig(path, dpi=120, bbox_inches="tight")
        if fig is not None:
            plt.close(fig)
    return ax
