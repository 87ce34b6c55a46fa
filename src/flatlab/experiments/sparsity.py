"""``flatlab run sparsity``: activation sparsity from flat minima, at CPU scale.

Reproduces targets 1-4 and 6 of the research note on Peng, Qi, Shi, Gao, "A Theoretical
Explanation of Activation Sparsity through Flat Minima and Adversarial Robustness"
(arXiv 2309.03004), measuring sparsity as the fraction of MLP pre-activations with zero
derivative (``h <= 0``) on held-out data in eval mode, per block, and reporting the change
from initialisation (``delta = final - init``; about 50% at init behind a LayerNorm):

1. emergence: a pre-LN residual ReLU MLP trained with SGD at a large learning rate;
   pass: ``delta >= 5`` points in every block and every seed.
2. noise scale: grid ``lr x B``; pass: Spearman(lr/B, delta) >= 0.7 over the grid cells.
3. SAM vs SGD, paired seeds (same init and data order); pass: SAM sparser in >= 4 of 5 seeds,
   with lower ``lambda_max`` (the top Hessian eigenvalue, our sharpness measure).
4. modules: ReLU vs J-SquaredReLU vs + zeroth bias (input / output) vs + restricted LayerNorm
   (``flatlab.sparsity.sparsify``) in a tiny MLP-mixer over 10 MNIST-1D patches; pass:
   J-SquaredReLU sparser than ReLU in every seed, accuracy gap reported.
5. derivative vs output sparsity with the shifted S-shaped activation
   (:mod:`~flatlab.experiments._sparsity_band`);
6. spectra, in the authors' units: the eigenvalue ratio ``lambda_max / lambda_min,nz`` of
   ``K K^T`` for every key weight ``K`` stays < 2x its init value for each weight decay; paired
   verdicts that training lowers it and that weight decay lowers it more; and random labels
   (delta >= delta with true labels - 2 points); the augmented-flatness identity gap is
   reported for the SAM/SGD models;
7. finetuning a trained ReLU model with the ReLU -> J-SquaredReLU ramp against continued
   training (:mod:`~flatlab.experiments._sparsity_finetune`).

8. the modules in a tiny pre-LN ViT on MNIST-1D patches, at matched accuracy
   (:mod:`~flatlab.experiments._sparsity_vit`).

``parts`` picks ``targets`` (1-3 and 6), ``modules`` (4), ``band`` (5), ``finetune`` (7) and
``vit`` (8); default: all.

Data: a random tanh-teacher classification task (32-d, 10 classes) for 1-3 and 6, MNIST-1D for
4. Every model is built from ``seed`` before training, so runs are paired across settings.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from flatlab.data import mnist1d, teacher_student_classification
from flatlab.experiments import ExperimentConfig, Run, register
from flatlab.experiments._registry import parts_of
from flatlab.experiments._sparsity_band import band_study
from flatlab.experiments._sparsity_finetune import Constrain, finetune_study
from flatlab.experiments._sparsity_vit import at_accuracy, vit_study
from flatlab.models import Mixer, ResidualMLP
from flatlab.report import plots
from flatlab.report.stats import Gate, paired_difference
from flatlab.sparsity import (
    activation_sparsity,
    augmented_flatness,
    sparsify,
    spectral_concentration,
)
from flatlab.train import ActivationSparsity, Evaluate, build_optimizer, fit

PARTS = ("targets", "modules", "band", "finetune", "vit")


class Config(ExperimentConfig):
    n: int = Field(4000, ge=100, description="synthetic examples (70% train, 15% test)")
    in_dim: int = Field(32, ge=2, description="synthetic input dimension")
    classes: int = Field(10, ge=2, description="synthetic classes")
    width: int = Field(64, ge=2, description="residual width d (blocks have 4d hidden units)")
    depth: int = Field(2, ge=1, description="number of pre-LN residual MLP blocks")
    epochs: int = Field(20, ge=1, description="training epochs per run")
    seeds: int = Field(3, ge=1, description="paired seeds for targets 1, 2, 4 and 6")
    sam_seeds: int = Field(5, ge=1, description="paired seeds for SAM vs SGD")
    lrs: list[float] = Field([0.05, 0.2, 0.5], description="SGD learning rates of the grid")
    batch_sizes: list[int] = Field([16, 64, 256], description="batch sizes of the grid")
    top_lr: float = Field(0.5, gt=0, description="large stable lr (emergence, spectra)")
    batch: int = Field(64, ge=1, description="batch size outside the grid")
    sam_lr: float = Field(0.2, gt=0, description="lr of the SAM vs SGD comparison")
    rhos: list[float] = Field([0.05, 0.1], description="SAM radii")
    wds: list[float] = Field([0.0, 0.01], description="weight decays of the spectra check")
    module_epochs: int = Field(20, ge=1, description="epochs of the module comparison")
    module_lr: float = Field(0.2, gt=0, description="SGD lr of the module comparison")
    module_seeds: int = Field(5, ge=1, description="paired seeds of the module comparison")
    mnist1d_n: int = Field(4000, ge=100, description="MNIST-1D examples for the modules")
    patch: int = Field(4, ge=1, description="MNIST-1D patch length (40 / patch tokens)")
    mixer_dim: int = Field(32, ge=2, description="token width of the MLP-mixer")
    parts: parts_of(PARTS) = Field(list(PARTS), description=f"parts to run, of {list(PARTS)}")
    band_seeds: int = Field(5, ge=2, description="paired seeds of target 5 (shifted S-shape)")
    band_output_tol: float = Field(0.1, ge=0, description="target 5: |f(h)| <= tol counts as "
                                   "a near-zero output")
    finetune_seeds: int = Field(5, ge=2, description="paired seeds of the finetuning study")
    finetune_lr: float = Field(0.2, gt=0, description="SGD lr of the base and finetuning runs")
    finetune_epochs: int = Field(10, ge=1, description="finetuning epochs after the base run")
    ramp_epochs: int = Field(5, ge=1, description="ReLU -> J-SquaredReLU ramp length (epochs)")
    acc_margin: float = Field(2.0, ge=0, description="finetuning: accuracy non-inferiority "
                              "margin (points)")
    vit_seeds: int = Field(5, ge=2, description="paired seeds of the ViT comparison")
    vit_epochs: int = Field(20, ge=1, description="AdamW epochs of each ViT run")
    vit_lr: float = Field(3e-3, gt=0, description="AdamW lr of the ViT runs")
    vit_dim: int = Field(32, ge=2, description="ViT token width")
    vit_heads: int = Field(4, ge=1, description="ViT attention heads")


def _spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation with average ranks for ties."""

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a))
        for value in np.unique(a):
            tie = a == value
            r[tie] = r[tie].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _train(run: Run, tag: str, model: torch.nn.Module, data: Any, *, seed: int, lr: float,
           batch: int, epochs: int, optimizer: str = "sgd", constrain: bool = False,
           sharpness: bool = False, **opt_kw: Any) -> dict[str, Any]:
    """Train one model; sparsity/spectra at init and at the end on held-out data.

    At several ranks (``run.parallel``) each rank measures its shard of the data and the
    measurements are the full data's (:func:`flatlab.train.parallel.measured`).
    """
    from flatlab.train.parallel import measured

    train, test = data.train, data.test
    spe = math.ceil(train[0].shape[0] / batch)  # steps per epoch
    test_part, test_across = measured(test, run.parallel)
    init = activation_sparsity(model, test_part, distributed=test_across)
    spec0 = spectral_concentration(model)
    spec0_mean = spectral_concentration(model, rtol=0.1, relative_to="mean_sq")
    opt = build_optimizer(optimizer, model.parameters(), lr=lr, **opt_kw)
    cbs = [Constrain()] if constrain else []
    cbs += [ActivationSparsity(test, every=spe), Evaluate({"test": test}, every=spe)]
    res = fit(model, opt, train, steps=epochs * spe, batch_size=batch, callbacks=cbs, run=run,
              tag=tag, seed=seed, log_every=spe, progress=False)
    out: dict[str, Any] = {"tag": tag, "history": res.history, "diverged": res.diverged}
    logged = [r["act_sparsity"] for r in res.history if "act_sparsity" in r]
    out["history_final"] = logged[-1] if logged else float("nan")
    if res.diverged:
        return out
    final = activation_sparsity(model, test_part, distributed=test_across)
    spec1 = spectral_concentration(model)
    spec1_mean = spectral_concentration(model, rtol=0.1, relative_to="mean_sq")
    out.update(
        init=init.per_layer, final=final.per_layer, acc=float(res.last("test_acc")),
        delta={k: final.per_layer[k] - init.per_layer[k] for k in final.per_layer},
        delta_mean=final.mean - init.mean, final_mean=final.mean,
        spectra_growth=max(spec1.eigenvalue_ratio[k] / spec0.eigenvalue_ratio[k]
                           for k in spec1.ratio),
        spectra_growth_mean_sq=max(spec1_mean.eigenvalue_ratio[k] / spec0_mean.eigenvalue_ratio[k]
                                   for k in spec1_mean.ratio),
        spectra_final=max(spec1.eigenvalue_ratio.values()),
        spectra_init=max(spec0.eigenvalue_ratio.values()),
        sv_growth=max(spec1.ratio[k] / spec0.ratio[k] for k in spec1.ratio),
    )
    if sharpness:
        from flatlab.curvature import top_eigenvalues

        part, across = measured(train, run.parallel)
        # the random start, pinned: the committed results were measured with it
        lam = top_eigenvalues(model, F.cross_entropy, part, 1, seed=0, init="random",
                              distributed=across)
        out["lambda_max"] = float(lam.values[0])
        af = augmented_flatness(model, F.cross_entropy, part, distributed=across)
        out["af"] = sum(af.value.values())
        out["af_gap"] = max(af.identity_gap.values())
    return out


def _mlp(cfg: Config, seed: int, in_dim: int, classes: int, activation: Any = "relu"):
    torch.manual_seed(seed)
    return ResidualMLP(in_dim, classes, width=cfg.width, depth=cfg.depth, activation=activation)


def _pts(v: float) -> str:
    return f"{100 * v:+.1f}"


#: ``--quick``'s preset: every part on tiny data, grids and networks
QUICK = dict(n=600, epochs=2, seeds=1, sam_seeds=2, lrs=[0.05, 0.5], batch_sizes=[64, 256],
             rhos=[0.1], wds=[0.0], module_epochs=1, mnist1d_n=400, width=16, mixer_dim=8,
             module_seeds=2, band_seeds=2, finetune_seeds=2, finetune_epochs=1, ramp_epochs=1,
             vit_seeds=2, vit_epochs=1, vit_dim=8, vit_heads=2)


@register("sparsity", Config, help="activation sparsity from flat minima (Peng et al. 2023)",
          quick=QUICK)
def run(cfg: Config, run: Run) -> dict:
    syn = teacher_student_classification(n=cfg.n, in_dim=cfg.in_dim, num_classes=cfg.classes,
                                         hidden=32, seed=cfg.seed, val_fraction=0.15,
                                         test_fraction=0.15)
    results: dict[str, Any] = {}
    if "targets" in cfg.parts:
        results.update(_targets(cfg, run, syn))
    if "modules" in cfg.parts:
        results.update(_modules(cfg, run))
    if "band" in cfg.parts:
        rows, verdicts, res = band_study(cfg, run, syn)
        results.update(res)
        run.add_section(
            "5. Derivative vs output sparsity (shifted S-shaped activation)",
            "f(h) = s(h - s_x) + s_y, s(u) = relu(u - 1.5)^2 - relu(-u - 1.5)^2: zero derivative "
            "on |h - s_x| <= 1.5 (excludes 0), output s_y there. ResidualMLP, SGD lr "
            f"{cfg.top_lr}, batch {cfg.batch}, {cfg.epochs} epochs (target 1's setting), "
            f"{cfg.band_seeds} paired seeds; test split, mean over blocks; near-zero output: "
            f"|f(h)| <= {cfg.band_output_tol:g}. Verdicts: paired final - init, 95% t CI.",
            table=verdicts)
        run.add_section("5. Per run", "", table=rows)
    if "finetune" in cfg.parts:
        rows, verdicts, res = finetune_study(cfg, run, syn)
        results.update(res)
        run.add_section(
            "7. Finetuning with the ReLU -> J-SquaredReLU ramp",
            f"Base: ReLU ResidualMLP, SGD lr {cfg.finetune_lr}, batch {cfg.batch}, {cfg.epochs} "
            f"epochs; then {cfg.finetune_epochs} epochs per arm from the same weights (ramp over "
            f"{cfg.ramp_epochs} epochs), {cfg.finetune_seeds} paired seeds. Verdicts: paired "
            "arm - continued, 95% t CI, in points.", table=verdicts)
        run.add_section("7. Per run", "", table=rows)
    if "vit" in cfg.parts:
        rows, verdicts, res = vit_study(cfg, run, mnist1d(n=cfg.mnist1d_n, seed=cfg.seed))
        results.update(res)
        run.add_section(
            "8. Tiny pre-LN ViT at matched accuracy",
            f"ViT over {40 // cfg.patch} MNIST-1D patches, width {cfg.vit_dim}, {cfg.depth} "
            f"blocks, AdamW lr {cfg.vit_lr:g}, batch {cfg.batch}, {cfg.vit_epochs} epochs, "
            f"{cfg.vit_seeds} paired seeds. Per seed the matched accuracy is the lowest best "
            "test accuracy of the variants; sparsity is read at the first epoch each reaches "
            "it. Verdicts: paired variant - ReLU, 95% t CI, in points.", table=verdicts)
        run.add_section("8. Per run", "", table=rows)
    return results


def _targets(cfg: Config, run: Run, syn: Any) -> dict:
    """Targets 1-4 and 6 (see the module docstring)."""
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    mk = lambda s, act="relu": _mlp(cfg, s, cfg.in_dim, cfg.classes, act)  # noqa: E731
    results: dict[str, Any] = {}

    # 2 (and 1: the top-lr cell at cfg.batch is the emergence run) -------------------------
    grid: dict[tuple[float, int, int], dict] = {}
    for lr in cfg.lrs:
        for b in cfg.batch_sizes:
            for s in seeds:
                grid[lr, b, s] = _train(run, f"grid-lr{lr}-b{b}-s{s}", mk(s), syn, seed=s,
                                        lr=lr, batch=b, epochs=cfg.epochs)
    emerge = {}
    for s in seeds:
        key = (cfg.top_lr, cfg.batch, s)
        emerge[s] = grid.get(key) or _train(run, f"emerge-s{s}", mk(s), syn, seed=s,
                                            lr=cfg.top_lr, batch=cfg.batch, epochs=cfg.epochs)
    ok = [r for r in emerge.values() if not r["diverged"]]
    min_delta = min((min(r["delta"].values()) for r in ok), default=float("nan"))
    results["emergence_min_delta_pts"] = round(100 * min_delta, 2)
    results["emergence_pass"] = bool(len(ok) == len(seeds) and min_delta >= 0.05)
    layers = list(ok[0]["final"]) if ok else []
    fig = plots.curves({f"seed {s}": r["history"] for s, r in emerge.items()},
                       [f"act_sparsity/{k}" for k in layers], x="step")
    run.add_section(
        "1. Emergence",
        f"SGD lr {cfg.top_lr}, batch {cfg.batch}, {cfg.epochs} epochs; test-set zero-derivative "
        "fraction per block over training. Pass: final - init >= 5 points in every block and "
        f"seed. Smallest change: {_pts(min_delta)} points -> "
        f"{'PASS' if results['emergence_pass'] else 'MISS'}.",
        table=[{"seed": s, **{f"init {k}": round(r["init"][k], 4) for k in layers},
                **{f"final {k}": round(r["final"][k], 4) for k in layers},
                "test acc": round(r["acc"], 4)} for s, r in emerge.items() if not r["diverged"]],
        figures=[run.savefig(fig, "emergence")])

    cells, rows = [], []
    for lr in cfg.lrs:
        for b in cfg.batch_sizes:
            runs = [grid[lr, b, s] for s in seeds if not grid[lr, b, s]["diverged"]]
            if not runs:
                rows.append({"lr": lr, "B": b, "lr/B": lr / b, "diverged": len(seeds)})
                continue
            d = float(np.mean([r["delta_mean"] for r in runs]))
            acc = float(np.mean([r["acc"] for r in runs]))
            cells.append((lr / b, d))
            rows.append({"lr": lr, "B": b, "lr/B": round(lr / b, 6), "delta (pts)": _pts(d),
                         "final": round(float(np.mean([r["final_mean"] for r in runs])), 4),
                         "test acc": round(acc, 4), "diverged": len(seeds) - len(runs)})
    rho_s = _spearman([c[0] for c in cells], [c[1] for c in cells])
    results["noise_spearman"] = round(rho_s, 3)
    results["noise_pass"] = bool(rho_s >= 0.7)
    hi, lo = (max(cfg.lrs), cfg.batch), (min(cfg.lrs), cfg.batch)
    beat = []
    for s in seeds:
        a, b_ = grid.get((*hi, s)), grid.get((*lo, s))
        if a and b_ and not a["diverged"] and not b_["diverged"]:
            beat.append((a["final_mean"] - b_["final_mean"], a["acc"] - b_["acc"]))
    results["noise_hi_vs_lo_pts"] = [round(100 * d, 2) for d, _ in beat]
    results["noise_hi_vs_lo_acc_pts"] = [round(100 * a, 2) for _, a in beat]
    results["noise_hi_vs_lo_pass"] = bool(
        len(beat) == len(seeds) and all(d >= 0.05 and abs(a) <= 0.02 + 1e-9 for d, a in beat))
    fig = _scatter(cells, "lr / B", "sparsity change from init (mean over blocks)")
    run.add_section(
        "2. Noise scale",
        f"Grid lr x B, {len(seeds)} seeds per cell, {cfg.epochs} epochs. Spearman(lr/B, mean "
        f"change) over cells = {rho_s:.3f} (pass >= 0.7: "
        f"{'PASS' if results['noise_pass'] else 'MISS'}). lr {hi[0]} vs {lo[0]} at B {hi[1]}: "
        f"sparsity gain per seed {[_pts(d) for d, _ in beat]} points, accuracy change "
        f"{[_pts(a) for _, a in beat]} points (pass: >= 5 points each, accuracy within 2).",
        table=rows, figures=[run.savefig(fig, "noise")])

    # 3 SAM vs SGD ----------------------------------------------------------------------
    sam_seeds = [cfg.seed + i for i in range(cfg.sam_seeds)]
    pairs: dict[str, list[dict]] = {"sgd": []}
    for s in sam_seeds:
        pairs["sgd"].append(_train(run, f"sgd-s{s}", mk(s), syn, seed=s, lr=cfg.sam_lr,
                                   batch=cfg.batch, epochs=cfg.epochs, sharpness=True))
    for rho in cfg.rhos:
        pairs[f"sam{rho}"] = [
            _train(run, f"sam{rho}-s{s}", mk(s), syn, seed=s, lr=cfg.sam_lr, batch=cfg.batch,
                   epochs=cfg.epochs, optimizer="sam", rho=rho, sharpness=True)
            for s in sam_seeds]
    rows, sam_pass = [], True
    for name, rs in pairs.items():
        for s, r in zip(sam_seeds, rs):
            if not r["diverged"]:
                rows.append({"optimizer": name, "seed": s, "final": round(r["final_mean"], 4),
                             "delta (pts)": _pts(r["delta_mean"]), "lambda_max":
                             round(r["lambda_max"], 3), "AF": f"{r['af']:.3g}",
                             "AF identity gap": f"{r['af_gap']:.1e}",
                             "test acc": round(r["acc"], 4)})
        if name == "sgd":
            continue
        wins = sum(r["final_mean"] > g["final_mean"] for r, g in zip(rs, pairs["sgd"])
                   if not (r["diverged"] or g["diverged"]))
        flatter = sum(r["lambda_max"] < g["lambda_max"] for r, g in zip(rs, pairs["sgd"])
                      if not (r["diverged"] or g["diverged"]))
        results[f"{name}_sparser_seeds"] = f"{wins}/{len(sam_seeds)}"
        results[f"{name}_flatter_seeds"] = f"{flatter}/{len(sam_seeds)}"
        need = math.ceil(0.8 * len(sam_seeds))  # 4 of 5
        results[f"{name}_pass"] = bool(wins >= need and flatter >= need)
        sam_pass &= results[f"{name}_pass"]
    results["sam_pass"] = bool(sam_pass)
    fig = _sam_figure(pairs)
    run.add_section(
        "3. SAM vs SGD",
        f"lr {cfg.sam_lr}, batch {cfg.batch}, paired seeds {sam_seeds}; lambda_max is the top "
        "Hessian eigenvalue of the training loss (Lanczos). Pass: SAM sparser in >= 4 of 5 "
        f"seeds with lower lambda_max -> {'PASS' if sam_pass else 'MISS'}. "
        + ", ".join(f"{k}: {v}" for k, v in results.items() if k.startswith("sam0")),
        table=rows, figures=[run.savefig(fig, "sam_vs_sgd")])

    # 6 spectra and random labels -------------------------------------------------------
    rows, growth, growth_sq = [], [], []
    log_growth: dict[float, dict[int, float]] = {}
    for wd in cfg.wds:
        for s in seeds:
            r = (grid.get((cfg.top_lr, cfg.batch, s)) if wd == 0 else None) or _train(
                run, f"wd{wd}-s{s}", mk(s), syn, seed=s, lr=cfg.top_lr, batch=cfg.batch,
                epochs=cfg.epochs, weight_decay=wd)
            if not r["diverged"]:
                growth.append(r["spectra_growth"])
                growth_sq.append(r["spectra_growth_mean_sq"])
                log_growth.setdefault(wd, {})[s] = math.log(r["spectra_growth"])
                rows.append({"wd": wd, "seed": s,
                             "λ_max/λ_min of KKᵀ, init -> final (max over K)":
                             f"{r['spectra_init']:.2f} -> {r['spectra_final']:.2f}",
                             "growth, rank rule": round(r["spectra_growth"], 3),
                             "growth, authors' rule": round(r["spectra_growth_mean_sq"], 3),
                             "growth of s_max/s_min": round(r["sv_growth"], 3),
                             "delta (pts)": _pts(r["delta_mean"])})
    spectra_verdicts = _spectra_verdicts(log_growth)
    g = torch.Generator().manual_seed(cfg.seed)
    shuffled = syn.train[1][torch.randperm(syn.train[1].shape[0], generator=g)]
    rand = dataclasses.replace(syn, train=(syn.train[0], shuffled))
    rl_gaps = []
    for s in seeds:
        r = _train(run, f"random-labels-s{s}", mk(s), rand, seed=s, lr=cfg.top_lr,
                   batch=cfg.batch, epochs=cfg.epochs)
        t = emerge[s]
        if not (r["diverged"] or t["diverged"]):
            rl_gaps.append(r["delta_mean"] - t["delta_mean"])
            rows.append({"wd": "random labels", "seed": s, "delta (pts)": _pts(r["delta_mean"]),
                         "true-label delta (pts)": _pts(t["delta_mean"])})
    results["spectra_max_growth"] = round(max(growth), 3) if growth else "n/a"
    results["spectra_pass"] = bool(growth and max(growth) < 2)
    for v in spectra_verdicts:
        results[f"spectra: {v.gate.claim}"] = v.passed
    results["spectra_max_growth_authors_rule"] = round(max(growth_sq), 3) if growth_sq else "n/a"
    results["random_label_gap_pts"] = [round(100 * v, 2) for v in rl_gaps]
    results["random_labels_pass"] = bool(rl_gaps and min(rl_gaps) >= -0.02)
    run.add_section(
        "6. Spectra and random labels",
        "In the authors' units, the eigenvalues of K Kᵀ for each key weight K: the largest "
        "ratio over key weights of (λ_max/λ_min,nz at the end) / (λ_max/λ_min,nz at init), "
        f"lr {cfg.top_lr}, batch {cfg.batch}, 'nonzero' = s > 1e-6 s_max (rank rule); pass < 2 "
        f"for every weight decay: {results['spectra_max_growth']} -> "
        f"{'PASS' if results['spectra_pass'] else 'MISS'}. With the authors' rule "
        "(s^2 > 0.1 mean s^2) the largest growth is "
        f"{results['spectra_max_growth_authors_rule']}. Marchenko-Pastur baseline of a "
        f"{4 * cfg.width}x{cfg.width} key weight: 9 (3 in singular values). "
        + " ".join(v.sentence() for v in spectra_verdicts) + " "
        "Random labels (train labels shuffled): change minus true-label change "
        f"{[_pts(v) for v in rl_gaps]} points, pass >= -2 -> "
        f"{'PASS' if results['random_labels_pass'] else 'MISS'}.",
        table=rows)
    run.add_section("6. Spectra: verdicts", "Paired over seeds (same initialization and data "
                    "order), 95% t CIs on the log growth of the eigenvalue ratio."
                    if spectra_verdicts else f"No verdict: they need >= 2 seeds, got "
                    f"seeds={cfg.seeds}.", table=[v.as_row() for v in spectra_verdicts])
    return results


def _spectra_verdicts(log_growth: dict[float, dict[int, float]]) -> list[Any]:
    """Paired verdicts on ``log(growth)`` of the eigenvalue ratio (``{wd: {seed: value}}``):
    training lowers the ratio (for each weight decay), and a larger weight decay lowers it
    more than none (the seeds both ran)."""
    out = []
    for wd, by_seed in log_growth.items():
        if len(by_seed) >= 2:
            vals = list(by_seed.values())
            out.append(Gate(f"training lowers the eigenvalue ratio of KKᵀ at wd {wd:g} "
                            "(log growth)", "less").check(paired_difference(vals, [0.0] *
                                                                             len(vals))))
    none = log_growth.get(0.0, {})
    for wd, by_seed in log_growth.items():
        common = sorted(set(by_seed) & set(none))
        if wd > 0 and len(common) >= 2:
            out.append(Gate(f"weight decay {wd:g} lowers the eigenvalue ratio more than none "
                            "(log growth)", "less").check(paired_difference(
                                [by_seed[s] for s in common], [none[s] for s in common])))
    return out


def _modules(cfg: Config, run: Run) -> dict:
    """Target 4: ReLU vs J-SquaredReLU (+ zeroth bias, restricted LN) in a tiny MLP-mixer."""
    seeds = [cfg.seed + i for i in range(cfg.module_seeds)]
    results: dict[str, Any] = {}
    m1 = mnist1d(n=cfg.mnist1d_n, seed=cfg.seed)
    variants = {
        "relu": {},
        "jsrelu": {"activation": "jsrelu"},
        "jsrelu+zb-input": {"activation": "jsrelu", "zeroth_bias": "input"},
        "jsrelu+zb-output": {"activation": "jsrelu", "zeroth_bias": "output"},
        "jsrelu+zb+rLN": {"activation": "jsrelu", "zeroth_bias": "input",
                          "layernorm": "scratch"},
    }
    mods: dict[str, list[dict]] = {}
    for name, kw in variants.items():
        mods[name] = []
        for s in seeds:
            torch.manual_seed(s)
            model = Mixer((40,), 10, patch_size=cfg.patch, dim=cfg.mixer_dim, depth=cfg.depth)
            if kw:
                sparsify(model, example=m1.train[0][:2], **kw)
            mods[name].append(_train(run, f"mod-{name}-s{s}", model, m1, seed=s,
                                     lr=cfg.module_lr, batch=cfg.batch,
                                     epochs=cfg.module_epochs, constrain=bool(kw)))
    rows = []
    for name, rs in mods.items():
        good = [r for r in rs if not r["diverged"]]
        rows.append({"variant": name,
                     "final": round(float(np.mean([r["final_mean"] for r in good] or [0])), 4),
                     "delta per seed (pts)": " ".join(_pts(r["delta_mean"]) for r in good),
                     "test acc": round(float(np.mean([r["acc"] for r in good] or [0])), 4),
                     "diverged": len(rs) - len(good)})
    js_wins = sum(j["final_mean"] > r["final_mean"] for j, r in zip(mods["jsrelu"], mods["relu"])
                  if not (j["diverged"] or r["diverged"]))
    gap = [j["acc"] - r["acc"] for j, r in zip(mods["jsrelu"], mods["relu"])
           if not (j["diverged"] or r["diverged"])]
    results["jsrelu_sparser_seeds"] = f"{js_wins}/{len(seeds)}"
    results["jsrelu_acc_gap_pts"] = round(100 * float(np.mean(gap)), 2) if gap else "n/a"
    results["modules_pass"] = bool(js_wins == len(seeds))
    matched = [at_accuracy(j["history"], r["acc"]) - r["history_final"]
               for j, r in zip(mods["jsrelu"], mods["relu"])
               if not (j["diverged"] or r["diverged"])]
    matched = [m for m in matched if math.isfinite(m)]
    results["jsrelu_matched_acc_pts"] = [round(100 * m, 2) for m in matched]
    fig = plots.bars({k: float(np.mean([r["delta_mean"] for r in v if not r["diverged"]] or [0]))
                      for k, v in mods.items()}, ylabel="sparsity change from init")
    run.add_section(
        "4. Modules",
        f"MLP-mixer (flatlab.models.Mixer, {40 // cfg.patch} tokens of MNIST-1D, width "
        f"{cfg.mixer_dim}, {cfg.depth} blocks; token- and channel-mixing MLPs all probed and "
        f"sparsified), SGD lr {cfg.module_lr}, batch {cfg.batch}, {cfg.module_epochs} epochs; "
        "variants built with flatlab.sparsity.sparsify (per-position zeroth bias, clip 0.1; "
        "restricted LayerNorm from scratch). Pass: J-SquaredReLU sparser than ReLU in every "
        f"seed: {js_wins}/{len(seeds)} -> {'PASS' if results['modules_pass'] else 'MISS'}; "
        f"accuracy gap (jsrelu - relu) {results['jsrelu_acc_gap_pts']} points. At matched "
        "accuracy (J-SquaredReLU at the first epoch its test accuracy reaches ReLU's final "
        "one, against ReLU's final; mean over all probed layers): "
        f"{[_pts(m) for m in matched]} points.",
        table=rows, figures=[run.savefig(fig, "modules")])

    ok = [(j, r) for j, r in zip(mods["jsrelu"], mods["relu"])
          if not (j["diverged"] or r["diverged"])]
    if len(ok) >= 2:
        sparser = Gate("J-SquaredReLU sparser than ReLU, final (pts)", "greater").check(
            paired_difference([100 * j["final_mean"] for j, _ in ok],
                              [100 * r["final_mean"] for _, r in ok]))
        pairs = [(100 * at_accuracy(j["history"], r["acc"]), 100 * r["history_final"])
                 for j, r in ok]
        pairs = [p for p in pairs if math.isfinite(p[0])]
        verdicts = [sparser.as_row()]
        results["jsrelu_sparser_ci"] = sparser.cell()
        results["jsrelu_sparser_pass"] = sparser.passed
        if len(pairs) >= 2:
            matched_v = Gate("J-SquaredReLU sparser than ReLU at matched accuracy (pts)",
                             "greater").check(paired_difference([p[0] for p in pairs],
                                                                [p[1] for p in pairs]))
            verdicts.append(matched_v.as_row())
            results["jsrelu_matched_ci"] = matched_v.cell()
            results["jsrelu_matched_pass"] = matched_v.passed
        run.add_section("4. Modules: verdicts", "Paired over seeds, 95% t CI "
                        "(flatlab.report.stats).", table=verdicts)
    return results


def _scatter(cells: list[tuple[float, float]], xlabel: str, ylabel: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    if cells:
        ax.scatter([c[0] for c in cells], [100 * c[1] for c in cells])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor labels ran into each other
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + " (pts)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _sam_figure(pairs: dict[str, list[dict]]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, rs in pairs.items():
        good = [r for r in rs if not r["diverged"]]
        ax.scatter([r["lambda_max"] for r in good], [r["final_mean"] for r in good], label=name)
    ax.set_xlabel("lambda_max (training loss)")
    ax.set_ylabel("final sparsity (mean over blocks)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
