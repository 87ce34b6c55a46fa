r"""Diagnoses of the two misses of ``flatlab run eos``: T2 USAM (η = 2, ρ = 0.5) and T7 late USAM.

**T2: the quadratic regression model (QRM) with a ρ sweep.** For each QRM seed (its own J, Q,
y) and each (η, ρ) of ``qrm_sweep`` (all with ρλ* ≤ 1), USAM runs for ``qrm_sweep_steps`` steps
while two instruments watch the same trajectory: the run's :class:`~flatlab.train.CurvatureMonitor`
(Lanczos, every ``qrm_eig_every`` steps, the T2 protocol) and :class:`QRMSharpness`, the exact
top eigenvalue of the closed-form Hessian at *every* step,

    H(θ) = (1/D) Σ_i [ g_i g_iᵀ + z_i Q_i ],   g_i = J_i + Q_i θ,   z_i = f_i(θ) − y_i.

Three questions, one statistic each (median of λ/λ*):

* **sampling**: every step vs every ``qrm_eig_every``-th step (at EOS the iterate has a period-2
  component, so an even sampling period reads one phase of it);
* **window**: steps ``[n/2, n]`` of a ``n = qrm_steps`` run (T2) vs ``[n'/2, n']`` with
  ``n' = qrm_sweep_steps`` (the note's 3,000-6,000);
* **the claim**: the trend of λ/λ* with ρλ* over seeds (mean and 95% t interval).

**T7: late USAM.** Linear stability says the top direction grows once ηλ(1+ρλ) > 2; it does not
say the run diverges, since a growing top component also moves λ (the catapult of Lewkowycz et
al., arXiv 2003.02218). The probe switches GD (at EOS) to USAM for ``late_probe_steps`` steps
over a range of radii and over ``t7_seeds`` initializations, and logs, every step, the loss and
(for the reference radius) λ_max: did it diverge, how high did the loss go, where did λ land.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flatlab.experiments._eos_lab import (
    Lab,
    Phase,
    QuadraticRegression,
    fmt,
    half_mse,
)
from flatlab.optim.stability import edge_of_stability
from flatlab.report.stats import mean_interval
from flatlab.train import Callback, FitState


class QRMSharpness(Callback):
    """Exact λ_max of a :class:`QuadraticRegression` (closed-form Hessian, ``eigvalsh``).

    Logs ``lambda_exact`` every ``every`` steps (cost: one ``(P, P)`` eigendecomposition).
    """

    def on_step(self, state: FitState) -> dict[str, float]:
        return {"lambda_exact": qrm_lambda_max(state.model)}


@torch.no_grad()
def qrm_lambda_max(model: QuadraticRegression) -> float:
    """Top eigenvalue of the QRM Hessian ``(1/D) Σ_i [g_i g_iᵀ + z_i Q_i]`` at ``model.theta``."""
    theta = model.theta
    d = model.jac.shape[0]
    g = model.jac + torch.einsum("ipq,q->ip", model.quad, theta)  # (D, P)
    z = model(torch.arange(d)) - model.targets  # (D,)
    h = (g.T @ g + torch.einsum("i,ipq->pq", z, model.quad)) / d  # (P, P)
    return float(torch.linalg.eigvalsh(h)[-1])


def _median(vals: list[float]) -> float:
    return float(torch.tensor(vals, dtype=torch.float64).median()) if vals else math.nan


def qrm_sweep(cfg: Any, run: Any) -> tuple[list[dict], list[dict], dict]:
    """The ρ sweep on the QRM: per-run rows, per-(η, ρ) summary rows, and results."""
    dtype = getattr(torch, cfg.dtype)
    n_long, n_t2, k = cfg.qrm_sweep_steps, cfg.qrm_steps, cfg.qrm_eig_every
    rows, per_setting, res = [], {}, {}
    for s in range(cfg.qrm_seeds):
        seed = cfg.seed + s

        def make(_seed: int = seed) -> QuadraticRegression:
            return QuadraticRegression(cfg.qrm_size, cfg.qrm_size, seed=_seed, dtype=dtype)

        lab = Lab(run, f"qrm-s{seed}", make, make().data(), half_mse, k, cfg.eig_tol,
                  extra=lambda ph: [QRMSharpness(1)])
        for lr, rho in cfg.qrm_sweep:
            edge = edge_of_stability("usam", lr, rho) if rho > 0 else 2 / lr
            if rho * edge > 1 + 1e-9:
                raise ValueError(f"qrm_sweep must keep rho * lambda* <= 1, got (lr={lr}, "
                                 f"rho={rho}) with rho * lambda* = {rho * edge:.3g}")
            phase = Phase("usam", lr, n_long, rho) if rho > 0 else Phase("gd", lr, n_long)
            tr = lab.trajectory([phase])
            exact = [(r["step"], r["lambda_exact"]) for r in tr.records if "lambda_exact" in r]
            monitored = [(r["step"], r["lambda_max"]) for r in tr.records if "lambda_max" in r]

            def med(pts: list, lo: int, hi: int, parity: int | None = None,
                    _edge: float = edge) -> float:
                return _median([lam / _edge for st, lam in pts if lo <= st <= hi and (
                    parity is None or st % 2 == parity)])

            row = {"seed": seed, "η": lr, "ρ": rho, "λ*": fmt(edge, 4), "ρλ*": fmt(rho * edge),
                   "T2 protocol (every k, steps n/2-n)": fmt(med(monitored, n_t2 // 2, n_t2), 4),
                   "exact every step, n/2-n": fmt(med(exact, n_t2 // 2, n_t2), 4),
                   "even steps": fmt(med(exact, n_t2 // 2, n_t2, 0), 4),
                   "odd steps": fmt(med(exact, n_t2 // 2, n_t2, 1), 4),
                   "exact every step, long window": fmt(med(exact, n_long // 2, n_long), 4),
                   "diverged": tr.diverged_at is not None}
            rows.append(row)
            per_setting.setdefault((lr, rho), []).append(row)
    summary = []
    for (lr, rho), rs in per_setting.items():
        ok = [r for r in rs if not r["diverged"]]
        out: dict[str, Any] = {"η": lr, "ρ": rho, "ρλ*": rs[0]["ρλ*"], "seeds": len(rs),
                               "diverged": len(rs) - len(ok)}
        for key, col in (("t2", "T2 protocol (every k, steps n/2-n)"),
                         ("exact", "exact every step, n/2-n"),
                         ("even", "even steps"), ("odd", "odd steps"),
                         ("long", "exact every step, long window")):
            vals = [r[col] for r in ok if math.isfinite(r[col])]
            iv = mean_interval(vals) if vals else None
            out[col] = iv.format(3) if iv else "-"
            if iv:
                res[f"qrm_sweep.eta{lr:g}_rho{rho:g}.{key}"] = iv.estimate
        summary.append(out)
    return rows, summary, res


def late_usam_probe(cfg: Any, lab: Lab) -> tuple[list[dict], dict]:
    """GD to ``late_start`` steps, then USAM for ``late_probe_steps`` steps at each radius."""
    lr, L, n = cfg.lr, cfg.late_start, cfg.late_probe_steps
    rows, res = [], {}
    for rho in cfg.late_probe_rhos:
        every = 1 if rho == cfg.late_usam_rho else None  # per-step λ at the reference radius
        tr = lab.trajectory([Phase("gd", lr, L),
                             Phase("usam", lr, n, rho, log_every=1, eig_every=every)])
        rows.append(_probe_row(tr, L, lr, rho, f"seed {cfg.seed}"))
        res[f"T7probe.rho{rho:g}.diverged"] = tr.diverged_at is not None
    return rows, res


def late_usam_seeds(cfg: Any, make_lab: Any) -> tuple[list[dict], dict]:
    """The T7 late-USAM switch (radius ``late_usam_rho``, no warm-up) over ``t7_seeds`` inits."""
    lr, L, n, rho = cfg.lr, cfg.late_start, cfg.late_probe_steps, cfg.late_usam_rho
    rows, res, div = [], {}, 0
    for s in range(1, cfg.t7_seeds):  # seed 0 is the probe's
        seed = cfg.seed + s
        tr = make_lab(seed).trajectory([Phase("gd", lr, L), Phase("usam", lr, n, rho, log_every=1)])
        rows.append(_probe_row(tr, L, lr, rho, f"seed {seed}"))
        div += tr.diverged_at is not None
    res["T7seeds.diverged"] = div
    return rows, res


def _probe_row(tr: Any, switch: int, lr: float, rho: float, who: str) -> dict[str, Any]:
    before = [r for r in tr.records if r["phase"] == 0 and "lambda_max" in r]
    after = [r for r in tr.records if r["phase"] == 1]
    lam_sw = before[-1]["lambda_max"] if before else math.nan
    loss_sw = before[-1]["loss"] if before else math.nan
    losses = [r["loss"] for r in after if "loss" in r]
    finite = [v for v in losses if math.isfinite(v)]
    lams = [r["lambda_max"] for r in after if "lambda_max" in r and math.isfinite(r["lambda_max"])]
    peak = max(finite, default=math.nan)
    peak_at = next((r["step"] - switch for r in after if r.get("loss") == peak), math.nan)
    return {"run": who, "ρ": rho, "λ at switch": fmt(lam_sw),
            "ηλ(1+ρλ) at switch": fmt(lr * lam_sw * (1 + rho * lam_sw), 2),
            "λ*": fmt(edge_of_stability("usam", lr, rho)),
            "diverged": "yes" if tr.diverged_at is not None else "no",
            "peak loss / loss at switch": fmt(peak / loss_sw, 3),
            "peak at (steps after)": peak_at,
            "min λ after": fmt(min(lams, default=math.nan)),
            "last λ": fmt(lams[-1] if lams else math.nan),
            "last loss": fmt(finite[-1] if finite else math.nan, 4)}


__all__ = ["QRMSharpness", "late_usam_probe", "late_usam_seeds", "qrm_lambda_max", "qrm_sweep"]
