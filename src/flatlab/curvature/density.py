"""Spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of a symmetric ``n x n`` matrix ``A = sum_i lambda_i u_i u_i^T`` is
``phi(t) = (1/n) sum_i delta(t - lambda_i)``. For a unit probe ``v`` (normalized Rademacher)
``E[v^T f(A) v] = (1/n) tr f(A) = integral f dphi``, and ``m`` Lanczos steps from ``v`` give
the Gauss quadrature rule of that integral (Golub & Meurant 2010): with
``T_m = S diag(theta) S^T``,

    v^T f(A) v  ~=  sum_j tau_j f(theta_j),   tau_j = S_{1j}^2,

exact for polynomials ``f`` of degree ``< 2m``. Averaging the rules of ``R`` probes gives nodes
``theta`` and weights ``tau / R`` summing to 1 (Lin, Saad & Yang 2016; Ubaru, Chen & Saad 2017;
used for neural nets by Ghorbani, Krishnan & Xiao 2019, arXiv:1901.10159). A smooth density
is ``sum_j w_j N(t; theta_j, sigma^2)`` on a grid.

Each Lanczos run stores its basis (``steps x n``) for full reorthogonalization; the tridiagonal
matrix is solved with the symmetric ``eigh`` (PyHessian used the non-symmetric ``eig``).
Shapes: ``nodes, weights (runs, steps)``; ``grid, density (grid_points,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from flatlab._checks import check_positive, check_positive_int
from flatlab.curvature._krylov import _orthogonalize, _work_dtype
from flatlab.curvature._progress import Meter
from flatlab.curvature.hvp import as_operator


@dataclass(frozen=True)
class DensityResult:
    """SLQ nodes and weights and a smoothed density.

    Attributes:
        nodes: Ritz values, shape ``(runs, steps)`` (float64, on the CPU).
        weights: quadrature weights, same shape, summing to 1 over all entries.
        grid, density: the smoothed density ``sum_j w_j N(t; theta_j, sigma^2)`` on a grid.
        sigma: the Gaussian width used.
        n_matvecs: operator products used (``runs * steps``).
        converged: every planned Lanczos step ran (``False``: a budget ended the
            measurement; the runs done are averaged, a cut run as its shorter Gauss rule).
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    grid: torch.Tensor
    density: torch.Tensor
    sigma: float
    n_matvecs: int
    converged: bool = True

    def moment(self, p: int) -> float:
        """``sum_j w_j theta_j^p``, an estimate of ``tr(A^p) / n``."""
        return float((self.weights * self.nodes**p).sum())


def _lanczos_quadrature(op, v: torch.Tensor, steps: int,
                        meter: Meter | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    n = v.shape[0]
    Q = torch.empty(n, steps, dtype=v.dtype, device=v.device)  # v is float32 or float64
    alpha, beta = [], []
    Q[:, 0] = v / v.norm()
    used = 0
    for j in range(steps):
        w = op.matvec(Q[:, j]).to(v.dtype)
        used += 1
        if meter is not None:
            meter.update(1)
        w, h = _orthogonalize(w, Q[:, : j + 1])
        alpha.append(float(h[j]))
        b = float(w.norm())
        if j + 1 == steps or b <= 1e3 * torch.finfo(v.dtype).eps * max(abs(a) for a in alpha):
            break  # the Krylov space is invariant: the rule is exact
        if meter is not None and meter.exhausted:
            break  # a budget ended: the shorter rule is still a Gauss rule
        beta.append(b)
        Q[:, j + 1] = w / b
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if beta:
        off = torch.tensor(beta, dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta, S[0] ** 2, used


def spectral_density(
    op_or_model: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    steps: int = 80,
    runs: int = 1,
    sigma: float | None = None,
    grid_points: int = 1000,
    seed: int = 0,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    progress: Any = True,
    params: Any = None,
    eval_mode: bool = True,
    distributed: Any = False,
) -> DensityResult:
    """Estimate the spectral density of a Hessian (or operator) by SLQ.

    Args:
        op_or_model: an operator, a square tensor, or a model (with ``loss_fn`` and ``data``,
            positional or by keyword).
        steps: Lanczos steps per run (capped at ``n``).
        runs: number of random probes averaged.
        sigma: width of the Gaussian smoothing (default 1% of the spectral range).
        grid_points: size of the grid, which spans the nodes plus 5 sigma either side.
        seed: seed of the probes.
        max_matvecs, max_seconds: budgets; when one ends, the runs so far are averaged (the
            cut run with its shorter Gauss rule) and ``converged=False``.
        progress: a progress bar on stderr when it is a terminal (``False``: never).
        params, eval_mode, distributed: as for :func:`~flatlab.curvature.hessian_operator`.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> d = spectral_density(A, steps=4)
        >>> round(d.moment(1), 10)
        2.5
    """
    steps = check_positive_int("steps", steps)
    runs = check_positive_int("runs", runs)
    grid_points = check_positive_int("grid_points", grid_points)
    op = as_operator(op_or_model, loss_fn=loss_fn, data=data, params=params, eval_mode=eval_mode,
                     distributed=distributed)
    n = op.shape[0]
    steps = min(steps, n)
    gen = torch.Generator().manual_seed(int(seed))
    nodes = torch.zeros(runs, steps, dtype=torch.float64)
    weights = torch.zeros(runs, steps, dtype=torch.float64)
    used, done = 0, 0
    meter = Meter("spectral density (SLQ)", runs * steps, max_matvecs=max_matvecs,
                  max_seconds=max_seconds, progress=progress, ranks=getattr(op, "ranks", None))
    with meter:
        for r in range(runs):
            if r > 0 and meter.exhausted:
                break
            v = (torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1).to(
                dtype=_work_dtype(op.dtype), device=op.device)
            theta, tau, u = _lanczos_quadrature(op, v, steps, meter)
            used += u
            done += 1
            nodes[r, : len(theta)] = theta
            weights[r, : len(theta)] = tau / tau.sum()  # padding keeps weight 0
    weights /= done
    converged = not meter.stopped
    lo, hi = float(nodes[weights > 0].min()), float(nodes[weights > 0].max())
    if sigma is None:
        sigma = max(hi - lo, abs(hi), 1e-12) / 100
    sigma = check_positive("sigma", sigma)
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points, dtype=torch.float64)
    z = (grid[:, None] - nodes.reshape(1, -1)) / sigma
    kernel = torch.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
    density = kernel @ weights.reshape(-1)
    return DensityResult(nodes, weights, grid, density, sigma, used, converged)


def plot_density(result: DensityResult, ax: Any = None, path: Any = None,
                 log: bool = True) -> Any:
    """Draw an SLQ spectral density as PyHessian's users know it; save to ``path`` if given.

    The smoothed density ``sum_j w_j N(t; theta_j, sigma^2)`` against the eigenvalue ``t``,
    on a log scale by default (the bulk near 0 and the outliers differ by orders of
    magnitude; values below ``1e-8`` of the peak are clipped), with the nodes ``theta_j`` as
    ticks along the bottom. matplotlib is imported only here. Without ``ax`` a standalone
    ``matplotlib.figure.Figure`` is drawn (Agg, no pyplot state, nothing shown).

    Returns:
        The matplotlib Axes.
    """
    from matplotlib.figure import Figure

    if ax is None:
        ax = Figure(figsize=(5, 3.5)).subplots()
    grid, dens = result.grid.numpy(), result.density.numpy()
    if log:
        floor = max(float(dens.max()) * 1e-8, 1e-300)
        ax.semilogy(grid, dens.clip(min=floor))
    else:
        ax.plot(grid, dens)
    live = result.weights > 0
    base = float(dens.max()) * 1e-8 if log else 0.0
    ax.plot(result.nodes[live].numpy(), [base] * int(live.sum()), "|", color="0.4",
            markersize=6)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel(f"density (smoothed, sigma={result.sigma:.2g})")
    if path is not None:
        ax.figure.savefig(path, dpi=120, bbox_inches="tight")
    return ax
