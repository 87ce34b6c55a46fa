r"""The gated network part of ``flatlab run eos``: minibatch SGD against SGD+SAM, paired seeds.

For each network (a tanh MLP and a tanh :class:`~flatlab.models.SmallCNN` on the same
standardized digits) and each seed ``s`` (initialization *and* minibatch order; SGD and
SGD+SAM of seed ``s`` share both), ``sgd_steps`` steps of batch-``sgd_batch`` SGD and of SGD+SAM
(radius ``switch_rho``, perturbation ``ρ g_B/‖g_B‖`` with the minibatch gradient ``g_B``) are run.
Every ``eig_every`` steps the run logs the full-batch λ_max (Lanczos on exact HVPs) and two SAM
edges ``λ*(ρ/‖g‖)`` of :func:`flatlab.optim.stability.edge_of_stability`:

* ``edge_sam``: ``‖g‖`` the full-batch unperturbed gradient norm (Long & Bartlett's definition,
  and the one the gate uses; fixed before the runs);
* ``edge_sam_batch``: ``‖g‖`` replaced by the mean minibatch norm ``E_B ‖g_B‖`` over
  ``grad_batches`` minibatches drawn at that iterate (:class:`MinibatchGradNorm`), the norm the
  SAM step actually divides by. Minibatch noise makes ``E‖g_B‖ > ‖g‖``, so this edge is higher.

Per seed the late statistics are medians over the second half of the run. Two claims go through
:mod:`flatlab.report.stats`:

1. **SGD+SAM sits on its edge**: the 95% t interval of the per-seed median ``λ/edge_sam`` lies
   inside ``[0.90, 1.10]`` (two one-sided gates, both must pass);
2. **SAM lowers λ_max**: the paired difference ``λ(SGD+SAM) − λ(SGD)`` has a 95% CI below 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flatlab.data import digits
from flatlab.experiments._eos_lab import Lab, Phase, Trajectory, fmt, mse_onehot, standardize
from flatlab.models import MLP, SmallCNN
from flatlab.optim.stability import edge_of_stability
from flatlab.report.stats import Gate, Verdict, mean_interval, paired_difference
from flatlab.train import Callback, FitState

EDGE_BAND = (0.90, 1.10)


class MinibatchGradNorm(Callback):
    """Mean minibatch gradient norm ``E_B ‖∇L_B(θ)‖`` at the current iterate, and its SAM edge.

    Logs ``batch_grad_norm`` (mean over ``n_batches`` batches of ``batch_size`` examples drawn
    without replacement from the training set, a fresh seeded draw per measurement) and
    ``edge_sam_batch = edge_of_stability("sam", lr, rho, grad_norm=batch_grad_norm)``. Eval
    mode; the gradients of the parameters are left untouched.

    Args:
        train: ``(x, y)``, the full training set, ``x`` ``(N, ...)``, ``y`` ``(N,)``.
        batch_size: examples per minibatch.
        rho: the SAM radius.
        every: measure every this many steps.
        n_batches: minibatches averaged per measurement.
        seed: seed of the draws (the draw at step t uses ``seed + t``).
    """

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], batch_size: int, rho: float,
                 every: int, n_batches: int = 10, seed: int = 0) -> None:
        super().__init__(every)
        if not 0 < batch_size <= len(train[1]):
            raise ValueError(f"batch_size must be in [1, {len(train[1])}], got {batch_size}")
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}")
        self.train, self.batch_size, self.rho = train, batch_size, rho
        self.n_batches, self.seed = n_batches, seed

    def on_step(self, state: FitState) -> dict[str, float]:
        x, y = self.train
        model = state.model
        params = [p for p in model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(self.seed + state.step)
        was = model.training
        model.eval()
        norms = []
        try:
            for _ in range(self.n_batches):
                idx = torch.randperm(len(y), generator=gen)[: self.batch_size]
                grads = torch.autograd.grad(state.loss_fn(model(x[idx]), y[idx]), params)
                norms.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
        finally:
            model.train(was)
        g = sum(norms) / len(norms)
        return {"batch_grad_norm": g,
                "edge_sam_batch": edge_of_stability("sam", state.lr, self.rho, grad_norm=g)}


def _data(cfg: Any, seed: int, image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits(seed=seed).train  # (N, 1, 8, 8)
    dtype = getattr(torch, cfg.dtype)
    x = standardize(x[: cfg.n_train].to(dtype))  # (n, 64), per-pixel standardized
    return (x.reshape(-1, 1, 8, 8) if image else x), y[: cfg.n_train]


def _net(cfg: Any, net: str) -> torch.nn.Module:
    if net == "mlp":
        return MLP(64, 10, cfg.width, cfg.depth, cfg.activation)
    return SmallCNN((1, 8, 8), 10, tuple(cfg.cnn_channels), cfg.activation)


def _make(cfg: Any, net: str, seed: int, dtype: torch.dtype):
    torch.manual_seed(seed)
    init = _net(cfg, net).to(dtype).state_dict()

    def make() -> torch.nn.Module:
        model = _net(cfg, net).to(dtype)
        model.load_state_dict(init)
        return model

    return make


def _late(tr: Trajectory, start: int) -> dict[str, float]:
    """Medians over the records with ``step >= start``: λ, both edges and λ over each edge."""
    recs = [r for r in tr.records if "lambda_max" in r and r["step"] >= start]
    if not recs:
        return {k: math.nan for k in ("lam", "edge", "edge_batch", "ratio", "ratio_batch")}

    def med(vals: list[float]) -> float:
        return float(torch.tensor(vals, dtype=torch.float64).median())

    lam = [r["lambda_max"] for r in recs]
    out = {"lam": med(lam), "loss": tr.final_loss()}
    if "edge_sam" in recs[0]:
        out["edge"] = med([r["edge_sam"] for r in recs])
        out["edge_batch"] = med([r["edge_sam_batch"] for r in recs])
        out["ratio"] = med([r["lambda_max"] / r["edge_sam"] for r in recs])
        out["ratio_batch"] = med([r["lambda_max"] / r["edge_sam_batch"] for r in recs])
        out["gnorm"] = med([r["grad_norm"] for r in recs])
        out["gnorm_batch"] = med([r["batch_grad_norm"] for r in recs])
    return out


def edge_gates(ratios: list[float], what: str) -> list[Verdict]:
    """The two one-sided gates of "the mean of ``ratios`` lies within 10% of 1"."""
    iv = mean_interval(ratios)
    lo, hi = EDGE_BAND
    return [Gate(f"{what}: mean λ/edge below {hi}", "less", hi).check(iv),
            Gate(f"{what}: mean λ/edge above {lo}", "greater", lo).check(iv)]


def minibatch_study(cfg: Any, run: Any) -> tuple[list[dict], list[dict], dict, dict]:
    """SGD vs SGD+SAM on each of ``cfg.net_models`` over ``cfg.net_seeds`` paired seeds.

    Returns:
        (per-seed rows, verdict rows, results for ``run.results()``, trajectories of seed 0).
    """
    b, n, lr, rho = cfg.sgd_batch, cfg.sgd_steps, cfg.lr, cfg.switch_rho
    rows, verdicts, res, trajs = [], [], {}, {}
    for net in cfg.net_models:
        x, y = _data(cfg, cfg.seed, image=net == "cnn")
        per: dict[str, list[float]] = {"sgd": [], "sam": [], "ratio": [], "ratio_batch": []}
        for s in range(cfg.net_seeds):
            seed = cfg.seed + s

            def extra(ph: Phase, _x=x, _y=y, _seed=seed) -> list:
                if ph.method != "sam":
                    return []
                return [MinibatchGradNorm((_x, _y), b, ph.rho, cfg.eig_every,
                                          cfg.grad_batches, seed=_seed)]

            lab = Lab(run, f"{net}-s{seed}", _make(cfg, net, seed, x.dtype), (x, y), mse_onehot,
                      cfg.eig_every, cfg.eig_tol, seed=seed, extra=extra)
            sgd = lab.trajectory([Phase("gd", lr, n, batch_size=b)])
            sam = lab.trajectory([Phase("sam", lr, n, rho, batch_size=b)])
            a, c = _late(sgd, n // 2), _late(sam, n // 2)
            per["sgd"].append(a["lam"])
            per["sam"].append(c["lam"])
            per["ratio"].append(c["ratio"])
            per["ratio_batch"].append(c["ratio_batch"])
            rows.append({"net": net, "seed": seed, "SGD λ_max": fmt(a["lam"]),
                         "SGD λ/(2/η)": fmt(a["lam"] * lr / 2), "SGD loss": fmt(a["loss"], 4),
                         "SAM λ_max": fmt(c["lam"]), "‖g‖ (full)": fmt(c["gnorm"], 4),
                         "E‖g_B‖": fmt(c["gnorm_batch"], 4), "edge(‖g‖)": fmt(c["edge"]),
                         "λ/edge(‖g‖)": fmt(c["ratio"]), "edge(E‖g_B‖)": fmt(c["edge_batch"]),
                         "λ/edge(E‖g_B‖)": fmt(c["ratio_batch"]), "SAM loss": fmt(c["loss"], 4)})
            if s == 0:
                trajs.update({f"{net} SGD": sgd, f"{net} SGD+SAM ρ={rho:g}": sam})
        if not all(math.isfinite(v) for vals in per.values() for v in vals):
            verdicts.append({"claim": f"{net}: a run diverged or was not measured",
                             "verdict": "not shown at this scale: non-finite values",
                             "passed": False})
            continue
        gates = edge_gates(per["ratio"], f"{net} SGD+SAM on edge(‖g‖)")
        gates += edge_gates(per["ratio_batch"], f"{net} SGD+SAM on edge(E‖g_B‖)")
        gates.append(Gate(f"{net}: λ_max(SGD+SAM) − λ_max(SGD) < 0", "less").check(
            paired_difference(per["sam"], per["sgd"])))
        for v in gates:
            verdicts.append(v.as_row())
            res[f"net.{v.gate.claim}"] = v.passed
        res[f"net.{net}.on_edge"] = gates[0].passed and gates[1].passed
        res[f"net.{net}.on_batch_edge"] = gates[2].passed and gates[3].passed
        res[f"net.{net}.ratio_mean"] = sum(per["ratio"]) / len(per["ratio"])
        res[f"net.{net}.ratio_batch_mean"] = sum(per["ratio_batch"]) / len(per["ratio_batch"])
        res[f"net.{net}.sam_minus_sgd"] = gates[-1].interval.estimate
    return rows, verdicts, res, trajs
