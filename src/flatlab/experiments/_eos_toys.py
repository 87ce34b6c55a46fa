"""The toy parts of ``flatlab run eos``: quadratics (target T1) and the quadratic regression
model (target T2), both trained through :func:`flatlab.train.fit`.

T1: on ``L = ½ θᵀAθ`` (20-dim, rotated, λ_max placed at 0.99 / 1.01 of the edge, the other
eigenvalues in [0.1, 0.9]·λ_max) GD and USAM must converge below and diverge above their edges;
normalized SAM must settle into the period-2 bounce of amplitude ``ηλρ/(2 − ηλ)`` along the top
eigenvector, where the SAM edge evaluated at the bounce's gradient norm returns λ_max, and
diverge for ``ηλ > 2``.

T2: on the quadratic regression model (:class:`~flatlab.experiments._eos_lab.QuadraticRegression`)
λ_max, measured every ``qrm_eig_every`` steps, is compared with each edge over the second half
of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from flatlab.data import quadratic
from flatlab.experiments._eos_lab import (
    Lab,
    Phase,
    QuadraticRegression,
    Trajectory,
    fmt,
    half_mse,
    window_stats,
    yes_no,
)
from flatlab.optim.stability import edge_of_stability, sam_bounce_amplitude
from flatlab.train import build_optimizer, fit


# ------------------------------------------------------------------------------- T1
def quadratic_table(cfg: Any) -> tuple[list[dict], bool]:
    """T1 table: GD/USAM/SAM on rotated quadratics with λ_max placed at 0.99/1.01 of each edge."""
    cases = [("gd", 0.1, 0.0), ("usam", 0.1, 0.05), ("usam", 0.01, 0.01), ("usam", 0.05, 0.5)]
    rows, all_ok = [], True
    for method, lr, rho in cases:
        edge = edge_of_stability(method, lr, rho)
        for frac in (0.99, 1.01):
            end = run_quadratic(cfg, method, lr, rho, frac * edge)
            ratio, div = end.shrink, end.diverged
            verdict = "diverged" if div or ratio > 1e2 else ("converged" if ratio < 1e-2 else "?")
            ok = verdict == ("converged" if frac < 1 else "diverged")
            all_ok &= ok
            rows.append({"method": method, "lr": lr, "rho": rho, "λ_max/edge": frac,
                         "edge": fmt(edge, 4), "|θ_T|/|θ_0|": f"{ratio:.2e}", "outcome": verdict,
                         "as predicted": yes_no(ok)})
    for lr_lam in (1.0, 1.8, 1.98, 2.02):
        lr, rho = 0.1, 0.05
        end = run_quadratic(cfg, "sam", lr, rho, lr_lam / lr)
        ratio, div, amp, gnorm = end.shrink, end.diverged, end.amplitude, end.grad_norm
        if lr_lam < 2:
            pred = sam_bounce_amplitude(lr, lr_lam / lr, rho)
            edge = edge_of_stability("sam", lr, rho, grad_norm=gnorm)
            err_a, err_e = abs(amp / pred - 1), abs(edge / (lr_lam / lr) - 1)
            ok = not div and err_a < 1e-3 and err_e < 1e-3
            outcome = (f"bounce A={amp:.5g} (pred {pred:.5g}); "
                       f"edge(|g|)/λ={edge / (lr_lam / lr):.5f}")
        else:
            ok = div or ratio > 1e2
            outcome = "diverged" if ok else f"bounded ({ratio:.2e})"
        all_ok &= ok
        rows.append({"method": "sam", "lr": lr, "rho": rho, "λ_max/edge": f"ηλ={lr_lam}",
                     "edge": "", "|θ_T|/|θ_0|": f"{ratio:.2e}", "outcome": outcome,
                     "as predicted": yes_no(ok)})
    return rows, all_ok


@dataclass(frozen=True)
class QuadraticEnd:
    """Where a run on a quadratic ended: ``shrink`` = |θ_T|/|θ_0| (inf if it diverged),
    ``diverged``, ``amplitude`` = |top-eigenvector component of θ_T|, ``grad_norm`` =
    ‖∇L(θ_T)‖."""

    shrink: float
    diverged: bool
    amplitude: float
    grad_norm: float


def run_quadratic(cfg: Any, method: str, lr: float, rho: float, top: float) -> QuadraticEnd:
    """:class:`QuadraticEnd` of ``cfg.quad_steps`` steps on a 20-dim rotated quadratic whose
    top eigenvalue is ``top``."""
    d = 20
    eigs = [top] + [top * (0.1 + 0.8 * i / (d - 2)) for i in range(d - 1)]
    model = quadratic(eigs, seed=cfg.seed)
    theta0 = model.theta.detach().clone()
    if method == "gd":
        opt = build_optimizer("sgd", model.parameters(), lr=lr)
    else:
        opt = build_optimizer(method, model.parameters(), lr=lr, rho=rho)
    res = fit(model, opt, model.dummy_data(), steps=cfg.quad_steps, loss_fn=model.loss_fn,
              progress=False, log_every=cfg.quad_steps)
    theta = model.theta.detach()
    diverged = res.diverged or getattr(opt, "skipped_steps", 0) > 0 or not bool(
        torch.isfinite(theta).all())
    ratio = float(theta.norm() / theta0.norm()) if not diverged else math.inf
    evals, evecs = torch.linalg.eigh(model.A)
    amplitude = float((evecs[:, -1] @ theta).abs())
    grad_norm = float((model.A @ theta).norm())
    return QuadraticEnd(ratio, diverged, amplitude, grad_norm)


# ------------------------------------------------------------------------------- T2
def qrm_table(cfg: Any, run: Any) -> tuple[list[dict], dict[str, Trajectory]]:
    """T2 table: GD, USAM and SAM on the quadratic regression model (the note's settings)."""
    size = cfg.qrm_size
    dtype = getattr(torch, cfg.dtype)

    def make() -> QuadraticRegression:
        return QuadraticRegression(size, size, seed=cfg.seed, dtype=dtype)

    lab = Lab(run, "qrm", make, make().data(), half_mse, cfg.qrm_eig_every, cfg.eig_tol)
    n = cfg.qrm_steps
    specs = [("GD η=2", Phase("gd", 2.0, n), (0.99, 1.01)),
             ("GD η=1 (control)", Phase("gd", 1.0, n), (0.0, 0.99)),
             ("USAM η=1 ρ=1", Phase("usam", 1.0, n, 1.0), (0.97, 1.03)),
             ("USAM η=2 ρ=0.5", Phase("usam", 2.0, n, 0.5), (0.97, 1.03)),
             ("USAM η=2 ρ=2 (known gap)", Phase("usam", 2.0, n, 2.0), None),
             ("SAM η=2 ρ=0.02", Phase("sam", 2.0, n, 0.02), (0.98, 1.02)),
             ("SAM η=1 ρ=0.05", Phase("sam", 1.0, n, 0.05), (0.98, 1.02))]
    rows, trajs = [], {}
    for name, ph, band in specs:
        traj = lab.trajectory([ph])
        trajs[name] = traj
        st = window_stats(traj.points(), n // 2)
        ok = band is not None and band[0] <= st["ratio"] <= band[1]
        if name.startswith("SAM"):  # the note's SAM target: λ within 2% of the median edge
            ok = band[0] <= st["lam"] / st["thr"] <= band[1]
        if traj.diverged_at is not None:
            name += f" (diverged at step {traj.diverged_at})"
        rows.append({"run": name, "median threshold": fmt(st["thr"]),
                     "median λ_max": fmt(st["lam"]),
                     "λ/threshold (median)": fmt(st["ratio"], 4),
                     "band": "report" if band is None else f"[{band[0]}, {band[1]}]",
                     "pass": "-" if band is None else yes_no(ok)})
    return rows, trajs
