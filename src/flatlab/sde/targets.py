r"""The reproduction targets of shared/research/sde_adaptive.md (T1-T6), as plain functions.

Each function runs discrete optimizers (many copies at once) and/or their SDEs on the toy
problem of Compagnoni et al., ICLR 2025 (arXiv 2411.15958): ``f = 0.5 sum_i lambda_i x_i^2``
with ``lambda = linspace(0.5, 5, d)``, ``x0 = 2``, additive noise of scale ``sigma`` in every
coordinate, and returns a dict of plain numbers / lists (measured value, closed form, relative
error, plus curves for figures). ``flatlab run sde`` turns them into the report. Several noise
levels share one run by stacking copies of the quadratic (:func:`grouped_loss_statistics`).
"Stationary" means the time average over the last third of the records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from flatlab.sde import laws
from flatlab.sde.compare import compare, run_optimizer
from flatlab.sde.integrate import Trajectory, grouped_loss_statistics, simulate
from flatlab.sde.models import SGDSDE, AdamWSDE, SignSGDSDE
from flatlab.sde.noise import GaussianNoise, StudentTNoise
from flatlab.sde.objectives import Quadratic

__all__ = ["Toy", "tracking", "noise_scaling", "heavy_tails", "weight_decay", "scaling",
           "adamw_sde_gap", "network", "loglog_slope", "earlier_sdes",
           "earlier_sdes_network"]

TAIL = 1 / 3


@dataclass(frozen=True)
class Toy:
    """The toy problem and run sizes shared by every target."""

    lr: float = 0.01
    dim: int = 10
    x0: float = 2.0
    paths: int = 2000
    seed: int = 0

    @property
    def eigenvalues(self) -> torch.Tensor:
        return torch.linspace(0.5, 5, self.dim, dtype=torch.float64)

    def start(self, copies: int = 1) -> torch.Tensor:
        return torch.full((self.dim * copies,), self.x0, dtype=torch.float64)

    def stacked(self, sigmas: list[float], nu: float | None = None):
        """Objective, noise, x0 and statistics of one copy of the quadratic per noise level."""
        k = len(sigmas)
        lam = self.eigenvalues.repeat(k)
        scale = torch.tensor(sigmas, dtype=torch.float64).repeat_interleave(self.dim)
        noise = GaussianNoise(scale) if nu is None else StudentTNoise(nu, scale)
        return Quadratic(lam), noise, self.start(k), grouped_loss_statistics(lam, k)


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def _tail(traj: Trajectory, name: str = "group_loss") -> list[float]:
    values = traj.stats[name]
    n = max(1, int(round(values.shape[0] * TAIL)))
    out = values[-n:].mean(0)
    return out.tolist() if out.dim() else [float(out)]


def _rel(measured: float, predicted: float) -> float:
    return measured / predicted - 1


def tracking(toy: Toy, sigmas: list[float], steps: int, record_every: int = 10) -> dict:
    """T1: discrete SignSGD against its erf-SDE (``dt = lr``); relative gap of mean losses."""
    q, noise, x0, stats = toy.stacked(sigmas)
    c = compare(SignSGDSDE(q, noise, toy.lr), x0, steps, paths=toy.paths,
                record_every=record_every, statistics=stats, seed=toy.seed)
    a, b = c.sde["group_loss"], c.discrete["group_loss"]
    gap = (a[1:] - b[1:]).abs() / b[1:]
    return {"sigmas": sigmas, "times": c.sde.times.tolist(), "sde": a.T.tolist(),
            "discrete": b.T.tolist(), "mean_gap": gap.mean(0).tolist(),
            "max_gap": gap.max(0).values.tolist()}


def noise_scaling(toy: Toy, sigmas: list[float], steps: int, sgd_steps: int,
                  with_sde: bool = True) -> dict:
    """T2: stationary loss against noise for SignSGD and SGD (discrete and SDE)."""
    q, noise, x0, stats = toy.stacked(sigmas)
    lr = toy.lr
    runs = {
        "signsgd": run_optimizer(lambda p: _signsgd(p, lr), q, noise, x0, steps, lr=lr,
                                 paths=toy.paths, record_every=10, statistics=stats,
                                 seed=toy.seed + 1),
        "sgd": run_optimizer(lambda p: torch.optim.SGD(p, lr=lr), q, noise, x0, sgd_steps, lr=lr,
                             paths=toy.paths, record_every=10, statistics=stats,
                             seed=toy.seed + 2),
    }
    if with_sde:
        runs["signsgd_sde"] = simulate(SignSGDSDE(q, noise, lr), x0, steps, paths=toy.paths,
                                       record_every=10, statistics=stats, seed=toy.seed + 3)
        runs["sgd_sde"] = simulate(SGDSDE(q, noise, lr), x0, sgd_steps, paths=toy.paths,
                                   record_every=10, statistics=stats, seed=toy.seed + 4)
    out: dict = {"sigmas": sigmas}
    for name, traj in runs.items():
        measured = _tail(traj)
        law = laws.signsgd_stationary_loss if name.startswith("signsgd") else (
            lambda eta, s, d: laws.sgd_stationary_loss(eta, s * s, d))
        predicted = [law(lr, s, toy.dim) for s in sigmas]
        out[name] = {"measured": measured, "predicted": predicted,
                     "rel_error": [_rel(m, p) for m, p in zip(measured, predicted)],
                     "slope": loglog_slope(sigmas, measured)}
    return out


def _signsgd(params, lr):
    from flatlab.optim import SignSGD

    return SignSGD(params, lr=lr)


def heavy_tails(toy: Toy, nus: list[float], steps: int, sigma: float = 1.0,
                with_sde: bool = True) -> dict:
    """T3: SignSGD under Student-t noise; SGD under the first ``nu`` (mean vs median)."""
    q, x0, lr = Quadratic(toy.eigenvalues), toy.start(), toy.lr
    rows = []
    for i, nu in enumerate(nus):
        noise = StudentTNoise(nu, sigma)
        traj = run_optimizer(lambda p: _signsgd(p, lr), q, noise, x0, steps, lr=lr,
                             paths=toy.paths, record_every=10, seed=toy.seed + 10 + i)
        predicted = laws.signsgd_stationary_loss(lr, sigma, toy.dim, nu=nu)
        row = {"nu": nu, "measured": _tail(traj, "loss_mean")[0], "predicted": predicted}
        if with_sde:
            sde = simulate(SignSGDSDE(q, noise, lr), x0, steps, paths=toy.paths,
                           record_every=10, seed=toy.seed + 20 + i)
            row["sde"] = _tail(sde, "loss_mean")[0]
        rows.append(row)
    sgd = run_optimizer(lambda p: torch.optim.SGD(p, lr=lr), q, StudentTNoise(nus[0], sigma), x0,
                        steps, lr=lr, paths=toy.paths, record_every=10, seed=toy.seed + 30)
    return {"signsgd": rows, "sgd_nu": nus[0], "sgd_times": sgd.times.tolist(),
            "sgd_mean": sgd.stats["loss_mean"].tolist(),
            "sgd_median": sgd.stats["loss_median"].tolist(),
            "sgd_stationary_median": _tail(sgd, "loss_median")[0]}


def _adamw(lr, betas, gamma, eps=1e-8):
    return lambda p: torch.optim.AdamW(p, lr=lr, betas=betas, eps=eps, weight_decay=gamma)


def weight_decay(toy: Toy, sigmas: list[float], gamma: float, steps: int,
                 free_sigmas: list[float], free_steps: int, rms_sigma: float = 2.0,
                 rms_gamma: float = 0.5) -> dict:
    """T4: RMSpropW against its formula; AdamW's stationary loss with and without decay."""
    from flatlab.optim import RMSpropW

    lr, lam = toy.lr, toy.eigenvalues
    rms = run_optimizer(lambda p: RMSpropW(p, lr=lr, beta=0.999, eps=1e-8, weight_decay=rms_gamma),
                        Quadratic(lam), GaussianNoise(rms_sigma), toy.start(), steps, lr=lr,
                        paths=toy.paths, record_every=10, seed=toy.seed + 40)
    out = {"rmspropw": {"sigma": rms_sigma, "gamma": rms_gamma,
                        "measured": _tail(rms, "loss_mean")[0],
                        "predicted": laws.adaptive_stationary_loss(lr, lam, rms_sigma, rms_gamma)}}
    for key, sig, g, n in (("adamw", sigmas, gamma, steps), ("adamw_free", free_sigmas, 0.0,
                                                                free_steps)):
        q, noise, x0, stats = toy.stacked(sig)
        traj = run_optimizer(_adamw(lr, (0.9, 0.999), g), q, noise, x0, n, lr=lr,
                             paths=toy.paths, record_every=10, statistics=stats,
                             seed=toy.seed + 41 + len(out))
        measured = _tail(traj)
        predicted = [laws.adaptive_stationary_loss(lr, lam, s, g) for s in sig]
        out[key] = {"sigmas": sig, "gamma": g, "measured": measured, "predicted": predicted,
                    "slope": loglog_slope(sig, measured)}
    out["bound"] = laws.adamw_loss_bound(lr, lam, gamma)
    return out


def scaling(toy: Toy, deltas: list[int], base_steps: int, sigma: float = 4.0,
            betas: tuple[float, float] = (0.98, 0.999), gamma: float = 0.5) -> dict:
    """T5: AdamW at batch B vs the scaling rule at delta B (k = k_base / delta), with controls."""
    q, x0 = Quadratic(toy.eigenvalues), toy.start()

    def run(lr, b, g, eps, s, steps, seed):
        traj = run_optimizer(_adamw(lr, b, g, eps), q, GaussianNoise(s), x0, steps, lr=lr,
                             paths=toy.paths, record_every=max(1, steps // 500), seed=seed)
        samples = (traj.steps.to(torch.float64) * (base_steps / steps)).tolist()
        return _tail(traj, "loss_mean")[0], samples, traj.stats["loss_mean"].tolist()

    base, samples, curve = run(toy.lr, betas, gamma, 1e-8, sigma, base_steps, toy.seed + 50)
    out = {"base": base, "curves": {"base (delta=1)": (samples, curve)}, "rows": []}
    for i, delta in enumerate(deltas):
        s = sigma / math.sqrt(delta)
        for name, wd_scaled in (("rule", True), ("sqrt rule, gamma unscaled", False)):
            try:
                r = laws.scaling_rule(delta, lr=toy.lr, betas=betas, weight_decay=gamma,
                                      scale_weight_decay=wd_scaled)
            except ValueError as err:
                out["rows"].append({"delta": delta, "rule": name, "error": str(err)})
                continue
            loss, xs, ys = run(r.lr, r.betas, r.weight_decay, r.eps, s, base_steps // delta,
                               toy.seed + 51 + 2 * i + wd_scaled)
            out["rows"].append({"delta": delta, "rule": name, "lr": r.lr, "betas": r.betas,
                                "weight_decay": r.weight_decay, "loss": loss,
                                "vs_base": _rel(loss, base)})
            out["curves"][f"{name} (delta={delta})"] = (xs, ys)
    return out


def adamw_sde_gap(toy: Toy, beta1s: list[float], steps: int, sigma: float = 4.0,
                  gamma: float = 1.0, substeps: int = 4) -> dict:
    """T6: discrete AdamW against the reconstructed AdamW SDE (``dt = lr / substeps``)."""
    q, x0, rows = Quadratic(toy.eigenvalues), toy.start(), []
    for i, b1 in enumerate(beta1s):
        sde = AdamWSDE(q, GaussianNoise(sigma), toy.lr, betas=(b1, 0.999), weight_decay=gamma)
        c = compare(sde, x0, steps, paths=toy.paths, substeps=substeps, record_every=10,
                    seed=toy.seed + 60 + i)
        disc, cont = _tail(c.discrete, "loss_mean")[0], _tail(c.sde, "loss_mean")[0]
        k100 = min(10, c.gap.shape[0]) - 1  # the record at step 100
        rows.append({"beta1": b1, "discrete": disc, "sde": cont, "stationary_gap": _rel(cont, disc),
                     "gap_at_k100": float(c.gap[k100]), "mean_gap": c.mean_gap})
    return {"sigma": sigma, "gamma": gamma, "substeps": substeps, "rows": rows}


def network(steps: int, paths: int, *, sigma: float = 0.5, seed: int = 0,
            hidden: int = 16, substeps: int = 1) -> dict:
    """A small MLP (8 -> hidden -> 3, tanh) on 256 synthetic examples (teacher labels),
    full-batch gradients plus Gaussian noise of scale ``sigma``: SGD, SignSGD and AdamW
    against their SDEs. Returns the loss curves and the relative gaps."""
    from torch import nn

    from flatlab.sde.objectives import NetworkObjective

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64)
    teacher = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = (x @ teacher).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    obj = NetworkObjective(model, nn.functional.cross_entropy, (x, y))
    noise = GaussianNoise(sigma)
    sdes = {
        "SGD (lr 0.05)": SGDSDE(obj, noise, 0.05),
        "SignSGD (lr 0.01)": SignSGDSDE(obj, noise, 0.01),
        "AdamW (lr 0.01, wd 0.1)": AdamWSDE(obj, noise, 0.01, betas=(0.98, 0.999),
                                            weight_decay=0.1),
    }
    out = {"params": obj.dim, "sigma": sigma, "rows": [], "curves": {}}
    for i, (name, sde) in enumerate(sdes.items()):
        sub = substeps if isinstance(sde, AdamWSDE) else 1
        c = compare(sde, obj.initial_point(), steps, paths=paths, substeps=sub,
                    record_every=max(1, steps // 50), seed=seed + i)
        out["rows"].append({"optimizer": name, "mean_gap": c.mean_gap, "max_gap": c.max_gap,
                            "final_discrete": float(c.discrete["loss_mean"][-1]),
                            "final_sde": float(c.sde["loss_mean"][-1])})
        out["curves"][name] = (c.discrete.steps.tolist(), c.discrete["loss_mean"].tolist(),
                               c.sde["loss_mean"].tolist())
    return out


def earlier_sdes(toy: Toy, sigmas: list[float], steps: int, seeds: int, *,
                 beta: float = 0.999, betas: tuple[float, float] = (0.98, 0.999),
                 marks: tuple[float, ...] = (0.01, 0.1, 0.5, 1.0)) -> dict:
    """Compagnoni et al.'s RMSpropW / AdamW SDEs against Malladi et al.'s (NeurIPS 2022) RMSprop
    / Adam SDEs, each against the same discrete optimizer run, on the stacked quadratic (one
    block per noise level), for ``seeds`` seeds.

    Per seed, optimizer, SDE and noise level: the relative gap of the mean loss,
    ``|E L_sde - E L_opt| / E L_opt``, at the fractions ``marks`` of the run and averaged over
    it (the discrete run of a seed is shared by both SDEs: paired).
    """
    from flatlab.sde.compare import optimizer_for
    from flatlab.sde.malladi import MalladiAdamSDE, MalladiRMSpropSDE
    from flatlab.sde.models import RMSpropWSDE

    q, noise, x0, stats = toy.stacked(sigmas)
    pairs = {"RMSprop": (RMSpropWSDE(q, noise, toy.lr, beta=beta),
                         MalladiRMSpropSDE(q, noise, toy.lr, beta=beta)),
             "Adam": (AdamWSDE(q, noise, toy.lr, betas=betas),
                      MalladiAdamSDE(q, noise, toy.lr, betas=betas))}
    every = max(1, steps // 100)
    rows = []
    for opt, (new, old) in pairs.items():
        for s in range(seeds):
            seed = toy.seed + 100 * s
            disc = run_optimizer(optimizer_for(new), q, noise, x0, steps, lr=toy.lr,
                                 paths=toy.paths, record_every=every, statistics=stats,
                                 seed=seed + 1)
            b = disc["group_loss"][1:]  # (records - 1, len(sigmas))
            for name, sde in (("Compagnoni et al. 2025", new), ("Malladi et al. 2022", old)):
                cont = simulate(sde, x0, steps, paths=toy.paths, dt=toy.lr, record_every=every,
                                statistics=stats, seed=seed)
                gap = (cont["group_loss"][1:] - b).abs() / b
                n = gap.shape[0]
                for j, sigma in enumerate(sigmas):
                    row = {"optimizer": opt, "sde": name, "seed": s, "sigma": sigma,
                           "mean_gap": float(gap[:, j].mean())}
                    for m in marks:
                        row[f"gap@{m:g}"] = float(gap[min(n - 1, max(0, round(m * n) - 1)), j])
                    rows.append(row)
    return {"sigmas": sigmas, "steps": steps, "rows": rows}


def earlier_sdes_network(steps: int, paths: int, seeds: int, *, sigma: float = 0.5,
                         lr: float = 0.01, hidden: int = 16) -> dict:
    """:func:`earlier_sdes` on the small network of :func:`network` (MLP 8 -> hidden -> 3 on
    256 teacher-labelled examples, full-batch gradient plus N(0, sigma^2) noise): RMSprop
    (beta 0.999) and Adam (betas 0.98, 0.999), both SDEs against the same discrete run."""
    from torch import nn

    from flatlab.sde.compare import optimizer_for
    from flatlab.sde.malladi import MalladiAdamSDE, MalladiRMSpropSDE
    from flatlab.sde.models import RMSpropWSDE
    from flatlab.sde.objectives import NetworkObjective

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(8, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()
    obj, noise = NetworkObjective(model, nn.functional.cross_entropy, (x, y)), GaussianNoise(sigma)
    pairs = {"RMSprop": (RMSpropWSDE(obj, noise, lr), MalladiRMSpropSDE(obj, noise, lr)),
             "Adam": (AdamWSDE(obj, noise, lr, betas=(0.98, 0.999)),
                      MalladiAdamSDE(obj, noise, lr, betas=(0.98, 0.999)))}
    every, rows = max(1, steps // 50), []
    for opt, (new, old) in pairs.items():
        for s in range(seeds):
            disc = run_optimizer(optimizer_for(new), obj, noise, obj.initial_point(), steps,
                                 lr=lr, paths=paths, record_every=every, seed=100 * s + 1)
            b = disc["loss_mean"][1:]
            for name, sde in (("Compagnoni et al. 2025", new), ("Malladi et al. 2022", old)):
                cont = simulate(sde, obj.initial_point(), steps, paths=paths, dt=lr,
                                record_every=every, seed=100 * s)
                gap = (cont["loss_mean"][1:] - b).abs() / b
                n = gap.shape[0]
                rows.append({"optimizer": opt, "sde": name, "seed": s, "sigma": sigma,
                             "mean_gap": float(gap.mean()),
                             **{f"gap@{m:g}": float(gap[min(n - 1, max(0, round(m * n) - 1))])
                                for m in (0.01, 0.1, 0.5, 1.0)}})
    return {"sigmas": [sigma], "steps": steps, "rows": rows, "params": obj.dim}
