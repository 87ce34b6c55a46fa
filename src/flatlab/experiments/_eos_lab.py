r"""Pieces of the ``eos`` experiment: its loss, the quadratic regression model, trajectories
of training phases (GD / USAM / SAM) through :func:`flatlab.train.fit`, and the statistics the
reproduction targets are read from.

**Loss.** ``mse_onehot(f, y) = mean_i ½ ‖f(x_i) − e_{y_i}‖²``: half the squared error *summed*
over the K outputs against one-hot targets and *averaged* over examples (Cohen et al.'s
convention, arXiv 2103.00065). The edges of :mod:`flatlab.optim.stability` refer to the Hessian
of exactly this loss; averaging over classes as well would divide it by K.

**Quadratic regression model** (Agarwala, Pedregosa & Pennington, arXiv 2210.04860):
``f_i(θ) = J_i·θ + ½ θᵀ Q_i θ`` for ``i = 1..D`` with ``J`` ``(D, P)`` and symmetric ``Q_i``
``(P, P)``, entries N(0, 1/P), targets ``y ~ N(0, 1)``, ``θ_0 = 0``, loss
``L = ‖f(θ) − y‖² / (2D)``. Its inputs are example indices ``(B,)`` (int64).

**Trajectories.** A trajectory is a list of :class:`Phase` (method, lr, rho, steps, optional
linear rho warm-up, optional minibatch size), each run as one ``fit`` call with its own tag and
a :class:`flatlab.train.CurvatureMonitor`. Trajectories that share leading phases share their
computation (the model state after each phase is cached by tag), which is how the switching
study reuses the GD and SAM runs.

**Statistics.** On the measured points ``(step, λ_max, threshold)`` of one phase: the first
crossing (first ``λ ≥ frac·threshold``) and the window statistics (median of λ, of the
threshold and of their ratio, 5th-95th percentile of the ratio) over the steps from
``crossing + offset`` to the end, as the note's targets prescribe.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatlab._checks import check_choice, check_nonnegative, check_positive, check_positive_int
from flatlab.optim.schedules import LinearWarmup
from flatlab.train import CurvatureMonitor, build_optimizer, fit

EDGE_KEY = {"gd": "edge_gd", "usam": "edge_usam", "sam": "edge_sam"}


def mse_onehot(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i ½ ‖outputs_i − onehot(targets_i)‖²``; outputs ``(N, K)``, targets ``(N,)`` int64."""
    onehot = F.one_hot(targets, outputs.shape[1]).to(outputs.dtype)  # (N, K)
    return 0.5 * (outputs - onehot).pow(2).sum(dim=1).mean()


def half_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i ½ (outputs_i − targets_i)²`` for scalar outputs ``(N,)`` (the QRM loss)."""
    return 0.5 * (outputs - targets).pow(2).mean()


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Flatten to ``(N, d)`` and center/scale every feature (constant features only centered)."""
    x = x.flatten(1)
    std = x.std(dim=0)
    return (x - x.mean(dim=0)) / torch.where(std > 1e-8, std, torch.ones_like(std))


class QuadraticRegression(nn.Module):
    """``f_i(θ) = J_i·θ + ½ θᵀ Q_i θ`` (see module docstring); ``forward(idx)`` returns ``(B,)``.

    Args:
        n_data: D, the number of examples. n_params: P, the dimension of θ.
        seed: seed of J, Q and the targets (:attr:`targets`, shape ``(D,)``).
        dtype: floating dtype of everything.
    """

    def __init__(self, n_data: int, n_params: int, seed: int = 0,
                 dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        d, p = check_positive_int("n_data", n_data), check_positive_int("n_params", n_params)
        g = torch.Generator().manual_seed(seed)
        jac = torch.randn(d, p, generator=g, dtype=dtype) / math.sqrt(p)  # (D, P)
        a = torch.randn(d, p, p, generator=g, dtype=dtype) / math.sqrt(p)
        # symmetrized, off-diagonal entries N(0, 1/P)
        quad = (a + a.transpose(1, 2)) / math.sqrt(2.0)  # (D, P, P)
        self.register_buffer("jac", jac)
        self.register_buffer("quad", quad)
        self.register_buffer("targets", torch.randn(d, generator=g, dtype=dtype))
        self.theta = nn.Parameter(torch.zeros(p, dtype=dtype))

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full training set ``(indices (D,), targets (D,))``."""
        return torch.arange(self.targets.shape[0]), self.targets

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        d, p = self.jac.shape
        outer = torch.outer(self.theta, self.theta).reshape(p * p)  # (P*P,)
        f = self.jac @ self.theta + 0.5 * (self.quad.reshape(d, p * p) @ outer)  # (D,)
        return f[idx]  # (B,)


@dataclass(frozen=True)
class Phase:
    """One training phase: ``steps`` steps of ``method`` ("gd" | "usam" | "sam") at ``lr``.

    ``warmup > 0`` ramps rho linearly from 0 over that many steps
    (:class:`flatlab.optim.schedules.LinearWarmup`); ``batch_size`` makes it minibatch SGD;
    ``log_every`` logs the training loss that often (default: at the measurements only);
    ``eig_every`` measures λ_max that often in this phase (default: the lab's period).
    """

    method: str
    lr: float
    steps: int
    rho: float = 0.0
    warmup: int = 0
    batch_size: int | None = None
    log_every: int | None = None
    eig_every: int | None = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, tuple(EDGE_KEY))
        check_positive("lr", self.lr)
        check_positive_int("steps", self.steps)
        check_nonnegative("rho", self.rho)
        if self.method == "gd" and self.rho != 0:
            raise ValueError(f"rho must be 0 for a gd phase, got {self.rho}")
        if self.method != "gd" and self.rho == 0:
            raise ValueError(f"rho must be > 0 for a {self.method} phase, got 0")

    @property
    def label(self) -> str:
        name = self.method if self.method == "gd" else f"{self.method}{self.rho:g}"
        name += f"_lr{self.lr:g}_{self.steps}"
        if self.warmup:
            name += f"_w{self.warmup}"
        if self.batch_size:
            name += f"_b{self.batch_size}"
        if self.log_every:
            name += f"_l{self.log_every}"
        if self.eig_every:
            name += f"_e{self.eig_every}"
        return name


@dataclass(frozen=True)
class Point:
    """One λ_max measurement of a trajectory: the global ``step``, ``lam`` = λ_max, ``edge``
    = the stability threshold of the phase's method there, and the training ``loss``."""

    step: int
    lam: float
    edge: float
    loss: float


@dataclass
class Trajectory:
    """The concatenated records of a list of phases (``step`` counted from the start)."""

    phases: tuple[Phase, ...]
    records: list[dict[str, Any]] = field(default_factory=list)
    diverged_at: int | None = None  # global step of divergence (non-finite / skipped steps)

    def points(self, phase: int | None = None) -> list[Point]:
        """The :class:`Point` of every measured record (of one phase if given).

        The threshold is the edge of the phase's own method (``edge_gd`` for a gd phase).
        """
        out = []
        for rec in self.records:
            if "lambda_max" not in rec or (phase is not None and rec["phase"] != phase):
                continue
            thr = rec.get(EDGE_KEY[self.phases[rec["phase"]].method])
            if thr is None:  # rho warm-up not yet started, e.g. the step-0 record
                thr = rec["edge_gd"]
            out.append(Point(rec["step"], rec["lambda_max"], thr, rec.get("loss", math.nan)))
        return out

    def final_loss(self, last: int = 100) -> float:
        """Median training loss over the last ``last`` steps (EOS losses oscillate)."""
        end = self.records[-1]["step"]
        vals = [r["loss"] for r in self.records
                if "loss" in r and r["step"] > end - last and math.isfinite(r["loss"])]
        return float(torch.tensor(vals).median()) if vals else math.nan


class Lab:
    """Runs trajectories on one model + data + loss, sharing common leading phases.

    Args:
        run: the run folder (``fit`` logs and checkpoints each phase under its tag).
        name: prefix of the tags (e.g. ``"digits"``).
        make_model: builds the model at its initial point (deterministic).
        train: the full training set ``(x, y)`` (Hessian and gradient norm are measured on it).
        loss_fn: mean-reduced loss.
        eig_every: measure λ_max every this many steps.
        eig_tol: relative residual tolerance of Lanczos.
        seed: seed of the minibatch order (``fit(seed=...)``; paired runs share it).
        extra: ``extra(phase)`` returns more callbacks for a phase (measured at the same steps).
    """

    def __init__(self, run: Any, name: str, make_model: Callable[[], nn.Module], train: Any,
                 loss_fn: Callable, eig_every: int, eig_tol: float, seed: int = 0,
                 extra: Callable[[Phase], list] | None = None) -> None:
        self.run, self.name, self.make_model = run, name, make_model
        self.train, self.loss_fn = train, loss_fn
        self.eig_every, self.eig_tol = eig_every, eig_tol
        self.seed, self.extra = seed, extra
        self._cache: dict[str, tuple[dict, list, int | None]] = {}

    def trajectory(self, phases: Sequence[Phase]) -> Trajectory:
        """Run (or reuse) ``phases`` in order from the initial model; stop at a divergence."""
        traj = Trajectory(tuple(phases))
        model, offset = self.make_model(), 0
        for i, ph in enumerate(phases):
            tag = self.name + "." + "+".join(p.label for p in phases[: i + 1])
            if tag not in self._cache:
                self._cache[tag] = self._run_phase(model, ph, tag, i, offset)
            state, recs, diverged_at = self._cache[tag]
            model.load_state_dict(state)
            traj.records.extend(recs)
            offset += ph.steps
            if diverged_at is not None:
                traj.diverged_at = diverged_at
                break
        return traj

    def _run_phase(self, model: nn.Module, ph: Phase, tag: str, index: int,
                   offset: int) -> tuple[dict, list, int | None]:
        rho: Any = LinearWarmup(ph.rho, ph.warmup) if ph.warmup else ph.rho
        if ph.method == "gd":
            opt = build_optimizer("sgd", model.parameters(), lr=ph.lr)
        else:
            opt = build_optimizer(ph.method, model.parameters(), lr=ph.lr, rho=rho)
        every = ph.eig_every or self.eig_every
        monitor = CurvatureMonitor(self.train, every=every, method=ph.method,
                                   rho=0.0 if ph.method == "gd" else rho, tol=self.eig_tol)
        callbacks = [monitor, *(self.extra(ph) if self.extra else [])]
        res = fit(model, opt, self.train, steps=ph.steps, loss_fn=self.loss_fn,
                  batch_size=ph.batch_size, callbacks=callbacks, run=self.run, tag=tag,
                  seed=self.seed, log_every=ph.log_every or every, progress=False)
        recs = []
        for rec in res.history:
            if index > 0 and rec["step"] == 0:
                continue  # the previous phase already measured this point
            rec = {k: _number(v) for k, v in rec.items()}
            recs.append({**rec, "step": rec["step"] + offset, "phase": index,
                         "gf_time": ph.lr * (rec["step"] + offset)})
        diverged_at = None
        skipped = int(getattr(opt, "skipped_steps", 0))
        if res.diverged or skipped > 0:
            diverged_at = offset + res.steps
        return copy.deepcopy(model.state_dict()), recs, diverged_at


def fmt(x: float, nd: int = 3) -> float:
    """``x`` rounded for a report table (non-finite values kept)."""
    return round(x, nd) if math.isfinite(x) else x


def yes_no(flag: bool) -> str:
    """A pass/fail cell: "yes" or "NO"."""
    return "yes" if flag else "NO"


def _number(value: Any) -> Any:
    """metrics.jsonl stores non-finite floats as strings ("nan", "inf"): read them back."""
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


# ------------------------------------------------------------------------------ statistics
def first_crossing(points: Sequence[Point], frac: float = 1.0,
                   after: int = -1) -> Point | None:
    """The first point after step ``after`` with ``λ >= frac·edge`` (None if there is none)."""
    return next((p for p in points if p.step > after and p.lam >= frac * p.edge), None)


def _quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q))


def window_stats(points: Sequence[Point], start: int) -> dict[str, float]:
    """Medians over the points with ``step >= start``: λ, threshold, ratio, and ratio p5/p95.

    Returns NaNs (and ``n = 0``) when the window is empty.
    """
    win = [(p.lam, p.edge) for p in points if p.step >= start and p.edge > 0]
    if not win:
        nan = math.nan
        return {"n": 0, "lam": nan, "thr": nan, "ratio": nan, "ratio_p5": nan, "ratio_p95": nan}
    ratios = [lam / thr for lam, thr in win]
    return {"n": len(win), "lam": _quantile([w[0] for w in win], 0.5),
            "thr": _quantile([w[1] for w in win], 0.5), "ratio": _quantile(ratios, 0.5),
            "ratio_p5": _quantile(ratios, 0.05), "ratio_p95": _quantile(ratios, 0.95)}


def value_at(points: Sequence[Point], step: float) -> float:
    """λ_max linearly interpolated at ``step`` (NaN outside the measured range)."""
    xs = [p.step for p in points]
    ys = [p.lam for p in points]
    if not xs or step < xs[0] or step > xs[-1]:
        return math.nan
    for i in range(1, len(xs)):
        if xs[i] >= step:
            w = (step - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] > xs[i - 1] else 1.0
            return ys[i - 1] + w * (ys[i] - ys[i - 1])
    return ys[-1]
