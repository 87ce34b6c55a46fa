"""The AdamW batch-size scaling rule under the minibatch noise of a real network on real data.

Compagnoni et al. (2025) derive the rule from the AdamW SDE: going from batch ``B`` to
``delta B``, set ``lr -> sqrt(delta) lr``, ``1 - beta_i -> delta (1 - beta_i)``, ``weight_decay
-> sqrt(delta) weight_decay`` and ``eps -> eps / sqrt(delta)``
(:func:`flatlab.sde.laws.scaling_rule`). The SDE then stays the same, so the loss at a
matched number of samples should too. The quadratic target T5 checks this with injected
Gaussian noise of variance ``sigma^2 / B``. Here the noise is the network's own minibatch
noise, whose covariance is the per-example gradient covariance over ``B``. That is the
assumption the rule rests on, not a model of it.

Protocol. A tanh MLP (64 -> ``width`` -> 10) on scikit-learn's 8x8 digits (the training split,
1,293 images), cross-entropy, trained by ``torch.optim.AdamW`` through :func:`flatlab.train.fit`:

* base: batch ``B`` for ``K`` steps;
* rule: batch ``delta B`` for ``K / delta`` steps with the scaled hyperparameters (the same
  number of samples);
* control: batch ``delta B`` for ``K / delta`` steps with the base's hyperparameters.

Seed ``s`` fixes the initialization, the same for every arm. The data order is drawn from
``s`` too, but it cannot be the same at another batch size. The measure is the late training
loss: the mean full-training-set loss over the evaluations in the last quarter of the
samples. Each claim is judged by :class:`~flatlab.report.stats.Gate` on a paired difference
over seeds of the change ``c = 100 (loss_arm / loss_base - 1)`` (percent):

* the rule keeps the loss within ``tolerance``: two one-sided gates on ``c_rule``, below
  ``+100 tol`` and above ``-100 tol``;
* the rule is closer to the base than the control: ``|c_control| - |c_rule|`` (percentage
  points) is above 0.

Diagnosis. The rule comes from an SDE in which Adam's second moment ``v`` is set by the
gradient noise, ``v ~ diag(Sigma) / B``, so that ``m / sqrt(v)`` scales as the rule assumes.
:func:`signal_share` measures how far that holds along each base run (8 times): the share of
``E[g_B^2]`` (the expected square of a batch-``B`` gradient, summed over coordinates) that is
the squared mean gradient rather than the noise, ``|g|^2 / (|g|^2 + tr(Sigma) / B)``. The
per-example gradients come from ``torch.func``. Near 0, the noise dominates, as the SDE
assumes. Near 1, Adam is close to sign descent and the rule no longer keeps the dynamics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from flatlab.data import digits
from flatlab.models import MLP
from flatlab.report.stats import Gate, Verdict, paired_difference
from flatlab.sde.laws import scaling_rule
from flatlab.train import Callback, Evaluate, fit

__all__ = ["Arm", "RealNoiseScaling", "SignalShare", "real_noise_scaling", "signal_share"]


@dataclass(frozen=True)
class Arm:
    """One training run: ``name`` (base / rule / control), ``delta``, ``seed``, the batch,
    steps and hyperparameters used, the late loss, and the curve of ``(samples, loss)``."""

    name: str
    delta: int
    seed: int
    batch: int
    steps: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    late_loss: float
    curve: list[tuple[int, float]] = field(repr=False)


@dataclass(frozen=True)
class RealNoiseScaling:
    """What :func:`real_noise_scaling` measured: every run, the verdicts (three per ``delta``,
    each claim naming it), and
    :func:`signal_share` along the base runs: ``signal[samples][batch]``, mean over seeds."""

    arms: list[Arm]
    verdicts: list[Verdict]
    tolerance: float
    signal: dict[int, dict[int, float]]

    def rows(self) -> list[dict[str, Any]]:
        """One row per (delta, arm): mean late loss over seeds and its ratio to the base."""
        base = {a.seed: a.late_loss for a in self.arms if a.name == "base"}
        out = []
        for delta in sorted({a.delta for a in self.arms if a.name != "base"}):
            for name in ("rule", "control"):
                arms = [a for a in self.arms if a.delta == delta and a.name == name]
                ratios = [a.late_loss / base[a.seed] for a in arms]
                a0 = arms[0]
                out.append({"delta": delta, "arm": name, "batch": a0.batch, "steps": a0.steps,
                            "lr": a0.lr, "betas": a0.betas, "weight_decay": a0.weight_decay,
                            "late loss / base (mean over seeds)":
                            sum(ratios) / len(ratios), "seeds": len(arms)})
        return out


def _late(history: list[dict[str, Any]], batch: int, total: int) -> tuple[list, float]:
    """The ``(samples, train_loss)`` curve and its mean over the last quarter of samples."""
    curve = [(int(r["step"]) * batch, float(r["train_loss"])) for r in history
             if "train_loss" in r]
    late = [v for s, v in curve if s >= 0.75 * total]
    return curve, (sum(late) / len(late) if late else math.nan)


def signal_share(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor],
                 batches: list[int]) -> dict[int, float]:
    """``|g|^2 / (|g|^2 + tr(Sigma) / B)`` for each ``B`` in ``batches``: ``g`` the mean
    cross-entropy gradient over ``data``, ``Sigma`` the covariance of its per-example gradients
    (shapes: ``x (N, ...)``, ``y (N,)``; one ``vmap`` over the examples)."""
    from torch.func import functional_call, grad, vmap

    names = [k for k, _ in model.named_parameters()]
    params = {k: p.detach() for k, p in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x[None],)), y[None])

    per = vmap(grad(loss), in_dims=(None, 0, 0))(params, *data)
    flat = torch.cat([per[k].reshape(per[k].shape[0], -1) for k in names], dim=1)  # (N, P)
    signal = float(flat.mean(0).pow(2).sum())
    noise = float(flat.var(0).sum())  # tr(Sigma)
    return {b: signal / (signal + noise / b) for b in batches}


class SignalShare(Callback):
    """Logs :func:`signal_share` of the model on ``data`` as ``signal_share_b<B>`` per batch
    size in ``batches`` (every ``every`` steps)."""

    def __init__(self, data: tuple[torch.Tensor, torch.Tensor], batches: list[int],
                 every: int) -> None:
        super().__init__(every)
        self.data, self.batches = data, list(batches)

    def on_step(self, state: Any) -> dict[str, float]:
        shares = signal_share(state.model, self.data, self.batches)
        return {f"signal_share_b{b}": v for b, v in shares.items()}


def real_noise_scaling(run: Any, *, deltas: list[int], steps: int, seeds: int, batch: int = 8,
                       lr: float = 1e-3, betas: tuple[float, float] = (0.98, 0.999),
                       weight_decay: float = 0.1, width: int = 32, evals: int = 40,
                       tolerance: float = 0.10, seed: int = 0) -> RealNoiseScaling:
    """Train every arm of the module docstring for ``seeds`` paired seeds.

    Args:
        run: the run folder (each fit is logged under ``t5real/<arm>/d<delta>/s<seed>``).
        deltas: batch-size factors; each must divide ``steps`` and keep ``delta (1 - beta_i)
            < 1``.
        steps: ``K``, the base run's steps at batch ``batch``.
        seeds: paired seeds ``seed, seed + 1, ...``.
        evals: full-training-set evaluations per run (at most one per step of the shortest
            run).
        tolerance: the relative loss change the rule may cause (the gates' threshold).

    Raises:
        ValueError: a ``delta`` that does not divide ``steps`` or that the rule refuses.
    """
    bad = [d for d in deltas if d < 2 or steps % d or steps // d < 4]
    if bad:
        raise ValueError(f"deltas must be >= 2, divide steps={steps} and leave at least 4 "
                         f"steps, got {bad}")
    evals = min(evals, steps // max(deltas))
    splits = digits(size=8, seed=0)
    train = splits.train
    n = train[0].shape[0]
    rules = {d: scaling_rule(d, lr=lr, betas=betas, weight_decay=weight_decay) for d in deltas}
    arms: list[Arm] = []
    batches = [batch] + [d * batch for d in deltas]
    shares: list[dict[int, dict[int, float]]] = []
    for s in range(seed, seed + seeds):
        plan = [("base", 1, batch, steps, lr, betas, weight_decay, 1e-8)]
        for d in deltas:
            r = rules[d]
            plan.append(("rule", d, d * batch, steps // d, r.lr, r.betas, r.weight_decay, r.eps))
            plan.append(("control", d, d * batch, steps // d, lr, betas, weight_decay, 1e-8))
        for name, d, b, k, a_lr, a_betas, a_wd, eps in plan:
            torch.manual_seed(s)  # the same initialization for every arm of seed s
            model = MLP(64, 10, width=width, depth=1, activation="tanh")
            opt = torch.optim.AdamW(model.parameters(), lr=a_lr, betas=tuple(a_betas),
                                    weight_decay=a_wd, eps=eps)
            callbacks: list[Callback] = [Evaluate({"train": train}, every=max(1, k // evals))]
            if name == "base":
                callbacks.append(SignalShare(train, batches, every=max(1, k // 8)))
            res = fit(model, opt, train, steps=k, batch_size=min(b, n), loss_fn=F.cross_entropy,
                      callbacks=callbacks,
                      run=run, tag=f"t5real/{name}/d{d}/s{s}", seed=s,
                      log_every=max(1, k // evals), progress=False)
            curve, late = _late(res.history, b, steps * batch)
            arms.append(Arm(name, d, s, b, k, float(a_lr), tuple(a_betas), float(a_wd), late,
                            curve))
            if name == "base":
                shares.append({int(r["step"]) * batch: {c: r[f"signal_share_b{c}"]
                                                        for c in batches}
                               for r in res.history if f"signal_share_b{batch}" in r})
    base = {a.seed: a.late_loss for a in arms if a.name == "base"}
    pct = 100 * tolerance
    verdicts: list[Verdict] = []
    for d in deltas:
        change = {(a.name, a.seed): 100 * (a.late_loss / base[a.seed] - 1) for a in arms
                  if a.delta == d}
        seeds_ = sorted(s for name, s in change if name == "rule")
        rule = [change["rule", s] for s in seeds_]
        ctrl = [change["control", s] for s in seeds_]
        gap = paired_difference(rule, [0.0] * len(seeds_))
        closer = paired_difference([abs(c) for c in ctrl], [abs(r) for r in rule])
        verdicts += [
            Gate(f"delta={d}: the rule changes the late loss by less than +{pct:g}%",
                 "less", pct, unit="%").check(gap),
            Gate(f"delta={d}: the rule changes the late loss by more than -{pct:g}%",
                 "greater", -pct, unit="%").check(gap),
            Gate(f"delta={d}: the rule is closer to the base than the unscaled control",
                 "greater", unit=" points").check(closer),
        ]
    signal = {at: {c: sum(sh[at][c] for sh in shares) / len(shares) for c in batches}
              for at in shares[0]}
    return RealNoiseScaling(arms, verdicts, tolerance, signal)
