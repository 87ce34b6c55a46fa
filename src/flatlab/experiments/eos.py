r"""``flatlab run eos``: SAM at the edge of stability ("SAM operates far from home").

Reproduces Agarwala & Dauphin (ICML 2023, arXiv 2302.08692) with the protocol of Cohen et al.
(arXiv 2103.00065) and the SAM edge of Long & Bartlett (arXiv 2309.12488). Full-batch steps
``θ ← θ − η ∇L(θ + e)`` with ``e = 0`` (GD), ``ρ∇L`` (USAM) or ``ρ∇L/‖∇L‖`` (SAM); the top
Hessian eigenvalue λ_max (Lanczos, exact HVPs, warm start) is measured every ``eig_every``
steps and compared with the edges of :func:`flatlab.optim.stability.edge_of_stability`:
``2/η``, ``λ* = (√(1+8ρ/η) − 1)/(2ρ)`` and the SAM edge with ``ρ/‖g_t‖`` in place of ρ
(``‖g_t‖`` the full-batch unperturbed gradient norm at the same iterate).

Parts (targets T1-T7 of the implementation note sam_eos.md):

1. quadratics (T1): converge/diverge at 0.99/1.01 of each edge, SAM's period-2 bounce;
2. the quadratic regression model (T2), window = the second half of the run;
3. an MLP (tanh, MSE of :func:`~flatlab.experiments._eos_lab.mse_onehot`: ½‖f − e_y‖² summed
   over classes, averaged over examples) on a fixed subset of digits: progressive sharpening and
   the GD / USAM / SAM plateaus (T3-T5), regularization far from the minimum (T6), and the
   switching study (T7: SAM early only, late with and without a rho warm-up, throughout);
4. the same MLP on MNIST-1D (shown, not gated);
5. minibatch SGD vs SGD+SAM on an MLP and a CNN over paired seeds, gated through
   :mod:`flatlab.report.stats` (:mod:`~flatlab.experiments._eos_net`);
6. diagnoses of the T2 and T7 misses: a ρ sweep on the quadratic regression model with λ_max
   exact at every step, and late-USAM switches over radii and seeds
   (:mod:`~flatlab.experiments._eos_diag`).

``parts`` selects which of them run (default: all).

Plateau statistics are medians over a window starting ``window_offset`` steps after the first
crossing of the threshold (the first crossing overshoots). Shapes: digits inputs ``(N, 64)``,
MNIST-1D ``(N, 40)``, standardized; outputs ``(N, 10)``; targets ``(N,)`` int64; N = n_train.
Results and their discussion: docs/results/eos.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, field_validator

from flatlab.data import digits, mnist1d
from flatlab.experiments import ExperimentConfig, Run, register
from flatlab.experiments._eos_diag import late_usam_probe, late_usam_seeds, qrm_sweep
from flatlab.experiments._eos_lab import (
    Lab,
    Phase,
    Trajectory,
    first_crossing,
    fmt,
    mse_onehot,
    standardize,
    value_at,
    window_stats,
    yes_no,
)
from flatlab.experiments._eos_net import minibatch_study
from flatlab.experiments._eos_switch import matched, switching
from flatlab.experiments._eos_toys import qrm_table, quadratic_table
from flatlab.experiments._registry import parts_of
from flatlab.models import MLP
from flatlab.report import plots

PARTS = ("quadratics", "qrm", "digits", "switching", "mnist1d", "networks", "qrm_sweep",
         "late_usam")


class Config(ExperimentConfig):
    """Settings of ``flatlab run eos`` (defaults: the note's digits protocol, CPU-sized)."""

    n_train: int = Field(1000, ge=10, description="examples of the fixed training subset")
    width: int = Field(128, ge=1, description="MLP hidden width")
    depth: int = Field(2, ge=1, description="MLP hidden layers")
    activation: str = Field("tanh", description="MLP activation")
    dtype: str = Field("float64", pattern="^(float32|float64)$", description="float dtype")
    lr: float = Field(0.2, gt=0, description="learning rate of the USAM / SAM / switching runs")
    gd_lrs: list[float] = Field([0.2, 0.15], description="GD learning rates (T3)")
    usam_rhos: list[float] = Field([0.05, 0.2], description="USAM radii (T4)")
    sam_rhos: list[float] = Field([0.005, 0.02], description="SAM radii (T5)")
    steps: int = Field(2000, ge=10, description="steps of the GD and switching runs")
    sam_steps: int = Field(1200, ge=10, description="steps of the USAM / SAM runs")
    eig_every: int = Field(20, ge=1, description="measure lambda_max every k steps")
    eig_tol: float = Field(1e-3, gt=0, description="Lanczos relative residual tolerance")
    window_offset: int = Field(150, ge=0, description="window start after the first crossing")
    switch_rho: float = Field(0.02, gt=0, description="SAM radius of the switching study")
    early_steps: int = Field(600, ge=1, description="SAM-only-early: SAM for these first steps")
    late_start: int = Field(1200, ge=1, description="SAM-late: GD for these steps, then SAM")
    late_usam_rho: float = Field(0.2, gt=0, description="USAM radius switched on late")
    rho_warmup: int = Field(300, ge=1, description="linear rho warm-up steps of late USAM")
    qrm_size: int = Field(50, ge=2, description="quadratic regression model: D = P")
    qrm_steps: int = Field(4000, ge=10, description="quadratic regression model steps")
    qrm_eig_every: int = Field(20, ge=1, description="QRM: lambda_max every k steps")
    quad_steps: int = Field(1500, ge=10, description="steps of each quadratic run")
    mnist1d: bool = Field(True, description="also run GD / USAM / SAM on MNIST-1D")
    mnist1d_steps: int = Field(1200, ge=10, description="steps of the MNIST-1D runs")
    sgd_batch: int = Field(100, ge=1, description="minibatch size of SGD vs SGD+SAM")
    sgd_steps: int = Field(1000, ge=10, description="steps of SGD vs SGD+SAM")
    parts: parts_of(PARTS) = Field(list(PARTS), description=f"parts to run, of {list(PARTS)}")
    net_models: list[str] = Field(["mlp", "cnn"], description="networks of SGD vs SGD+SAM "
                                  "(mlp, cnn)")
    net_seeds: int = Field(5, ge=2, description="paired seeds of SGD vs SGD+SAM")
    cnn_channels: list[int] = Field([16, 32], description="SmallCNN conv widths")
    grad_batches: int = Field(10, ge=1, description="minibatches averaged for E|g_B|")
    qrm_seeds: int = Field(5, ge=1, description="QRM draws (J, Q, y) of the rho sweep")
    qrm_sweep_steps: int = Field(6000, ge=10, description="steps of each rho-sweep run")
    qrm_sweep: list[tuple[float, float]] = Field(
        [(2.0, 0.0), (2.0, 0.1), (2.0, 0.5), (2.0, 1.0), (2.0, 2.0), (1.0, 1.0)],
        description="(lr, rho) of the QRM sweep, rho*lambda* <= 1 (rho 0: GD)")
    late_probe_rhos: list[float] = Field([0.05, 0.1, 0.2, 0.5, 1.0],
                                         description="USAM radii switched on late (probe)")
    late_probe_steps: int = Field(100, ge=1, description="steps after the late switch (probe)")
    t7_seeds: int = Field(3, ge=1, description="inits of the late USAM switch (seed 0 + others)")

    @field_validator("net_models")
    @classmethod
    def _known_nets(cls, v: list[str]) -> list[str]:
        if not v or any(m not in ("mlp", "cnn") for m in v):
            raise ValueError(f"net_models must be a non-empty list of 'mlp' / 'cnn', got {v}")
        return v


#: ``--quick``'s preset (applied by the registry's config resolution): every part on tiny sizes
QUICK = dict(n_train=100, width=16, steps=60, sam_steps=40, eig_every=10, window_offset=10,
             early_steps=20, late_start=30, rho_warmup=10, qrm_size=10, qrm_steps=100,
             qrm_eig_every=10, quad_steps=300, mnist1d_steps=30, sgd_batch=20, sgd_steps=20,
             net_seeds=2, cnn_channels=[4, 8], grad_batches=2, qrm_seeds=2, qrm_sweep_steps=100,
             qrm_sweep=[(2.0, 0.0), (2.0, 0.5)], late_probe_rhos=[0.2], late_probe_steps=5,
             t7_seeds=2)

TARGETS = {"gd": (0.97, 1.08), "usam": (0.95, 1.10), "sam": (0.95, 1.10)}
FAR = 3.0  # "far from home": training loss >= FAR x the final loss when λ reaches its edge
T6_TEXT = ("t* = first measured step with λ_max >= 0.95·threshold. Far from home at t*: the "
           f"training loss L(t*) >= {FAR:g}·L_T, L_T the median training loss over the last 100 "
           "steps of the run, and GD (same η) at t* still below 0.95·2/η and rising. The "
           "'log-loss still ahead' column is log(L(t*)/L_T) / log(L_0/L_T): the fraction of the "
           "run's decrease in log-loss that is still to come at t*.")


# ------------------------------------------------------------------------------- data
def _mlp_data(cfg: Config, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    if which == "digits":
        x, y = digits(seed=cfg.seed).train
    else:
        x, y = mnist1d(n=max(200, math.ceil(cfg.n_train / 0.7) + 10), seed=cfg.seed).train
    dtype = getattr(torch, cfg.dtype)
    return standardize(x[: cfg.n_train].to(dtype)), y[: cfg.n_train]


def _mlp_lab(cfg: Config, run: Run, which: str) -> Lab:
    x, y = _mlp_data(cfg, which)
    torch.manual_seed(cfg.seed)
    init = MLP(x.shape[1], 10, cfg.width, cfg.depth, cfg.activation).to(x.dtype).state_dict()

    def make() -> MLP:
        model = MLP(x.shape[1], 10, cfg.width, cfg.depth, cfg.activation).to(x.dtype)
        model.load_state_dict(init)
        return model

    return Lab(run, which, make, (x, y), mse_onehot, cfg.eig_every, cfg.eig_tol)


def _plateau(traj: Trajectory, cfg: Config, phase: int | None = None) -> dict[str, float]:
    pts = traj.points(phase)
    cross = first_crossing(pts)
    st = window_stats(pts, cross.step + cfg.window_offset) if cross else window_stats([], 0)
    st["cross"] = cross.step if cross else math.nan
    st["lam0"] = pts[0].lam if pts else math.nan
    st["peak"] = max((p.lam for p in pts), default=math.nan)
    return st


def _plateau_row(name: str, method: str, st: dict, extra: str = "") -> dict[str, Any]:
    lo, hi = TARGETS[method]
    return {"run": name, "λ_0": fmt(st["lam0"]), "first crossing (step)": st["cross"],
            "peak": fmt(st["peak"]), "median threshold": fmt(st["thr"]),
            "median λ_max": fmt(st["lam"]), "median λ/threshold": fmt(st["ratio"]),
            "p5-p95": f"{fmt(st['ratio_p5'])}-{fmt(st['ratio_p95'])}", "band": f"[{lo}, {hi}]",
            "pass": yes_no(lo <= st["ratio"] <= hi) + extra, "window n": st["n"]}


def _fig(run: Run, name: str, histories: dict, x: str = "step", kind: str = "eig") -> str:
    fig = plots.eigenvalue_plot(histories, x=x) if kind == "eig" else plots.curves(
        histories, "loss", x=x)
    return str(run.savefig(fig, name))


def _hist(trajs: dict[str, Trajectory]) -> dict[str, list]:
    return {name: t.records for name, t in trajs.items()}


# ------------------------------------------------------------------------------- T3-T7
def _mlp_main(cfg: Config, run: Run, lab: Lab, which: str) -> tuple[dict, dict]:
    """GD at each lr, USAM and SAM at each radius: T3, T4, T5 and T6 tables."""
    lr, res, trajs = cfg.lr, {}, {}
    for g_lr in cfg.gd_lrs:
        if g_lr == lr and cfg.late_start < cfg.steps:
            phases = [Phase("gd", g_lr, cfg.late_start),
                      Phase("gd", g_lr, cfg.steps - cfg.late_start)]
        else:
            phases = [Phase("gd", g_lr, cfg.steps)]
        trajs[f"GD η={g_lr:g}"] = lab.trajectory(phases)
    for rho in cfg.usam_rhos:
        trajs[f"USAM ρ={rho:g}"] = lab.trajectory([Phase("usam", lr, cfg.sam_steps, rho)])
    for rho in cfg.sam_rhos:
        if rho == cfg.switch_rho and cfg.early_steps < cfg.sam_steps:
            phases = [Phase("sam", lr, cfg.early_steps, rho),
                      Phase("sam", lr, cfg.sam_steps - cfg.early_steps, rho)]
        else:
            phases = [Phase("sam", lr, cfg.sam_steps, rho)]
        trajs[f"SAM ρ={rho:g}"] = lab.trajectory(phases)

    rows, gd_ref = [], None
    for name, traj in trajs.items():
        method = traj.phases[0].method
        st = _plateau(traj, cfg)
        extra = ""
        if method == "gd" and traj.phases[0].lr == lr:
            gd_ref = (traj, st)
        if method == "usam" and gd_ref is not None:
            _, gd_st = gd_ref
            below = st["lam"] / gd_st["lam"]
            verdict = "below" if below < 0.9 else "NOT clearly below"
            extra = f"; λ/GD plateau = {fmt(below)} ({verdict})"
            res[f"{which}.{name}.vs_gd"] = below
        rows.append(_plateau_row(name, method, st, extra))
        res[f"{which}.{name}.ratio"] = st["ratio"]
    t6 = _far_from_home(cfg, trajs, gd_ref) if gd_ref else []
    for r in t6:
        res[f"{which}.T6.{r['run']}.loss_ratio"] = r.get("loss / final loss", math.nan)
    return {"rows": rows, "t6": t6, "trajs": trajs, "gd_ref": gd_ref}, res


def _far_from_home(cfg: Config, trajs: dict, gd_ref: tuple) -> list[dict]:
    """T6: first step with λ >= 0.95·threshold, the loss there vs the final, GD at that step."""
    gd_traj, gd_st = gd_ref
    gd_pts = gd_traj.points()
    rows = []
    for name, traj in trajs.items():
        if traj.phases[0].method == "gd":
            continue
        hit = first_crossing(traj.points(), 0.95)
        if hit is None:
            rows.append({"run": name, "step": "never", "pass": "NO"})
            continue
        step, loss = hit.step, hit.loss
        final = traj.final_loss()
        lam_gd, lam_gd_next = value_at(gd_pts, step), value_at(gd_pts, step + 50)
        rising = lam_gd_next > lam_gd and lam_gd < 0.95 * gd_st["thr"]
        ok = loss >= FAR * final and rising
        loss0 = traj.points()[0].loss
        ahead = math.log(loss / final) / math.log(loss0 / final)
        rows.append({"run": name, "step": step, "L_0": fmt(loss0, 4), "loss there": fmt(loss, 4),
                     "final loss": fmt(final, 4), "loss / final loss": fmt(loss / final, 2),
                     "log-loss still ahead": fmt(ahead, 2),
                     "GD λ at step (2/η)": f"{fmt(lam_gd)} ({fmt(gd_st['thr'])})",
                     "GD λ 50 steps later": fmt(lam_gd_next), "pass": yes_no(ok)})
    return rows


def _gf_collapse(trajs: dict) -> tuple[str, float]:
    """Max relative gap between the GD λ curves at matched η·t before the first crossing."""
    gds = [(t.phases[0].lr, t.points()) for n, t in trajs.items() if n.startswith("GD")]
    if len(gds) < 2:
        return "needs two GD learning rates", math.nan
    (la, pa), (lb, pb) = gds[0], gds[1]
    ends = []
    for lr_, pts in ((la, pa), (lb, pb)):
        c = first_crossing(pts)
        ends.append(lr_ * (c.step if c else pts[-1].step))
    tmax = 0.8 * min(ends)
    gaps = []
    for frac in (0.2, 0.4, 0.6, 0.8, 1.0):
        ta = value_at(pa, frac * tmax / la)
        tb = value_at(pb, frac * tmax / lb)
        gaps.append(abs(ta - tb) / max(ta, tb))
    worst = max(gaps)
    return f"max |Δλ|/λ over η·t in (0, {fmt(tmax, 1)}] = {fmt(worst, 4)}", worst


@register("eos", Config, help="SAM at the edge of stability: λ_max vs 2/lr, USAM and SAM edges",
          quick=QUICK)
def run(cfg: Config, run: Run) -> dict:
    """Quadratics, quadratic regression model, MLP on digits / MNIST-1D: GD, USAM, SAM at EOS."""
    results: dict[str, Any] = {}
    parts = set(cfg.parts)
    loss_note = ("Loss: ½‖f(x) − onehot(y)‖² summed over the 10 outputs and averaged over "
                 f"examples; {cfg.n_train} standardized training examples, full batch, "
                 f"{cfg.dtype}, tanh MLP {cfg.depth}x{cfg.width} (PyTorch default init, seed "
                 f"{cfg.seed}); λ_max by Lanczos on exact HVPs every {cfg.eig_every} steps, "
                 "warm-started. SAM's rho is a length (perturbation ρ g/‖g‖), USAM's multiplies "
                 "the gradient (ρ g). Window: from the first crossing + "
                 f"{cfg.window_offset} steps to the end of the run.")

    if "quadratics" in parts:
        rows, ok = quadratic_table(cfg)
        results["T1.all_as_predicted"] = ok
        run.add_section("T1: quadratics", "20-dim rotated quadratics, λ_max set relative to each "
                        "edge; SAM bounce amplitude ηλρ/(2−ηλ) and the SAM edge at the bounce "
                        f"({cfg.quad_steps} steps). These restate linear stability on a fixed "
                        "quadratic (a check of the optimizers and the formulas), not the paper.",
                        table=rows)

    if "qrm" in parts:
        rows, qtrajs = qrm_table(cfg, run)
        results["T2.rows"] = len(rows)
        for r in rows:
            results[f"T2.{r['run']}"] = r["λ/threshold (median)"]
        run.add_section("T2: quadratic regression model",
                        f"D = P = {cfg.qrm_size}, θ0 = 0, L = ‖z‖²/(2D); medians over steps "
                        f"{cfg.qrm_steps // 2}-{cfg.qrm_steps}. For SAM the pass test is median "
                        "λ / median edge.", table=rows,
                        figures=[_fig(run, "qrm_lambda", _hist(qtrajs))])

    lab = _mlp_lab(cfg, run, "digits")
    if "digits" in parts:
        main, res = _mlp_main(cfg, run, lab, "digits")
        results.update(res)
        trajs = main["trajs"]
        gf_text, gap = _gf_collapse(trajs)
        results["T3.gf_time_gap"] = gap
        gd = {k: v for k, v in trajs.items() if k.startswith("GD")}
        run.add_section("T3-T5: MLP on digits, plateaus", loss_note + " " + "Progressive "
                        f"sharpening in gradient-flow time: {gf_text}.", table=main["rows"],
                        figures=[_fig(run, "digits_lambda", _hist(trajs)),
                                 _fig(run, "digits_lambda_gf_time", _hist(gd), x="gf_time"),
                                 _fig(run, "digits_loss", _hist(trajs), kind="loss")])
        run.add_section("T6: regularization far from the minimum", T6_TEXT, table=main["t6"])

    if "switching" in parts:
        rows, res, strajs = switching(cfg, lab)
        results.update(res)
        run.add_section("T7: switching SAM on and off",
                        f"η = {cfg.lr}, SAM ρ = {cfg.switch_rho}, USAM ρ = {cfg.late_usam_rho} "
                        f"(rho warm-up: linear over {cfg.rho_warmup} steps). In full batch the "
                        "optimizer active at the end sets the final λ_max.", table=rows,
                        figures=[_fig(run, "switching_lambda", _hist(strajs)),
                                 _fig(run, "switching_loss", _hist(strajs), kind="loss")])
        run.add_section("T7: matched points", "λ_max / training loss of each switching run at "
                        "the same steps (nearest measurement; '-' where the run is shorter or "
                        "diverged).", table=matched(cfg, strajs))

    if "mnist1d" in parts:
        mcfg = cfg.model_copy(update={"gd_lrs": [cfg.lr], "usam_rhos": cfg.usam_rhos[-1:],
                                      "sam_rhos": cfg.sam_rhos[-1:], "steps": cfg.mnist1d_steps,
                                      "sam_steps": cfg.mnist1d_steps, "late_start": 10**9})
        m1, res = _mlp_main(mcfg, run, _mlp_lab(mcfg, run, "mnist1d"), "mnist1d")
        results.update(res)
        run.add_section("MNIST-1D (same protocol, not gated)", loss_note, table=m1["rows"],
                        figures=[_fig(run, "mnist1d_lambda", _hist(m1["trajs"]))])

    if "networks" in parts:
        rows, verdicts, res, ntrajs = minibatch_study(cfg, run)
        results.update(res)
        run.add_section("Minibatch SGD vs SGD+SAM: per seed",
                        f"Batch {cfg.sgd_batch}, η = {cfg.lr}, SAM ρ = {cfg.switch_rho}, "
                        f"{cfg.sgd_steps} steps, {cfg.net_seeds} paired seeds (init and batch "
                        "order); medians over the second half; λ_max of the full-batch loss; "
                        "edge(‖g‖) from the full-batch gradient norm, edge(E‖g_B‖) from the mean "
                        f"norm of {cfg.grad_batches} minibatches at the same iterate.", table=rows,
                        figures=[_fig(run, "minibatch_lambda", _hist(ntrajs))])
        run.add_section("Minibatch SGD vs SGD+SAM: verdicts", "95% t intervals over seeds "
                        "(flatlab.report.stats); on the edge = the interval of the mean ratio "
                        "inside [0.90, 1.10].", table=verdicts)

    if "qrm_sweep" in parts:
        rows, summary, res = qrm_sweep(cfg, run)
        results.update(res)
        run.add_section("T2 diagnosis: QRM rho sweep", f"{cfg.qrm_seeds} QRM draws, "
                        f"{cfg.qrm_sweep_steps} steps; λ/λ* medians: the T2 protocol (Lanczos "
                        f"every {cfg.qrm_eig_every} steps, steps {cfg.qrm_steps // 2}-"
                        f"{cfg.qrm_steps}), the exact λ at every step over the same window, its "
                        "even and odd steps, and the long window. Mean [95% t CI] over draws.",
                        table=summary)
        run.add_section("T2 diagnosis: per draw", "", table=rows)

    if "late_usam" in parts:
        rows, res = late_usam_probe(cfg, lab)
        results.update(res)
        more, res = late_usam_seeds(cfg, lambda seed: _mlp_lab(
            cfg.model_copy(update={"seed": seed}), run, f"digits-s{seed}"))
        results.update(res)
        run.add_section("T7 diagnosis: late USAM", f"GD for {cfg.late_start} steps, then "
                        f"USAM without warm-up for {cfg.late_probe_steps} steps, loss logged "
                        f"every step (λ every step at ρ = {cfg.late_usam_rho} on seed "
                        f"{cfg.seed}); other seeds change the initialization and data split.",
                        table=rows + more)
    return {k: (fmt(v, 4) if isinstance(v, float) else v) for k, v in results.items()}
