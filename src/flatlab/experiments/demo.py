r"""The demo: an MLP on MNIST-1D trained by SGD, SAM and GAM, with the top Hessian eigenvalue.

Full-batch training (every step sees all training examples), so the curvature story is clean:
under gradient descent the top eigenvalue ``λ_max`` of the training-loss Hessian rises until it
reaches ``2/η`` and then hovers there (edge of stability; Cohen et al., arXiv 2103.00065).
SAM (Foret et al., arXiv 2010.01412), ``θ ← θ − η ∇L(θ + ρ g/‖g‖)``, settles lower, at the SAM
edge ``ηλ(1 + ρλ/‖g‖) = 2`` (Agarwala & Dauphin, arXiv 2302.08692; Long & Bartlett,
arXiv 2309.12488). GAM (Zhang et al., arXiv 2303.03108) penalises first-order flatness
``ρ max_{‖δ‖≤ρ} ‖∇L(θ+δ)‖`` and is plotted against 2/η. The report shows the eigenvalue
against these edges, loss and accuracy curves, forward-backward passes per step, and the
final worst-case sharpness ``max_{‖δ‖≤ρ} L(θ+δ) − L(θ)``.

Model: ``MLP(40 -> width x depth -> 10)``; data: MNIST-1D (40-dim signals, 10 classes,
generated locally); loss: cross-entropy (mean over examples). ``quick=True`` shrinks data,
steps and eigenvalue checks so the whole demo runs in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from flatlab.experiments._registry import ExistingDir, ExperimentConfig, register
from flatlab.report import plots
from flatlab.train import (
    Checkpoint,
    CurvatureMonitor,
    Evaluate,
    Run,
    Sharpness,
    build_optimizer,
    evaluate,
    fit,
)

OptimizerName = Literal["sgd", "sam", "asam", "usam", "gam", "samgam", "adamw"]


class Config(ExperimentConfig):
    """Settings of ``flatlab demo`` / ``flatlab run demo``."""

    optimizers: list[OptimizerName] = Field(
        ["sgd", "sam", "gam"], description="optimizers to train, one run each")
    n: int = Field(4000, ge=100, description="MNIST-1D examples (70/10/20 train/val/test)")
    data_dir: ExistingDir | None = Field(
        None, description="existing folder to cache MNIST-1D in (default: flatlab's cache)")
    width: int = Field(64, ge=1, description="MLP hidden width")
    depth: int = Field(2, ge=1, description="MLP hidden layers")
    activation: str = Field("relu", description="MLP activation")
    lr: float = Field(0.5, gt=0, description="learning rate (plain full-batch steps)")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    rho: float = Field(0.05, ge=0, description="SAM / ASAM / USAM radius")
    gam_rho: float = Field(0.2, ge=0, description="GAM radius")
    gam_alpha: float = Field(0.6, ge=0, description="GAM weight of the flatness gradient")
    eig_every: int = Field(50, ge=1, description="steps between top-eigenvalue measurements")
    eig_examples: int = Field(4000, ge=10, description="training examples used for λ_max "
                              "(capped at the training set: the full-batch Hessian by default)")
    sharpness_rho: float = Field(0.05, gt=0, description="radius of the final worst-case "
                                 "sharpness max_{|d|<=rho} L(w+d) - L(w)")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints")


def _optimizer(name: str, model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    kw: dict = {"lr": cfg.lr}
    if name in ("sam", "asam", "usam"):
        kw["rho"] = cfg.rho
    elif name in ("gam", "samgam"):
        kw.update(rho=cfg.gam_rho, alpha=cfg.gam_alpha)
    return build_optimizer(name, model.parameters(), **kw)


def quick(cfg: Config) -> dict:
    """``--quick``'s preset: at most 80 steps on 1500 examples, λ_max on 300 of them 5 times."""
    steps = min(cfg.steps, 80)
    return {"steps": steps, "n": min(cfg.n, 1500), "eig_every": max(steps // 4, 1),
            "eig_examples": min(cfg.eig_examples, 300), "checkpoint_every": max(steps // 3, 1)}


@register("demo", Config, help="MLP on MNIST-1D: SGD vs SAM vs GAM, top eigenvalue vs 2/lr",
          quick=quick)
def run(cfg: Config, run: Run) -> dict:
    from flatlab.data import mnist1d
    from flatlab.models import MLP

    steps = cfg.steps
    data = mnist1d(n=cfg.n, seed=cfg.seed, cache_dir=cfg.data_dir)
    x, y = data.train
    eig_data = (x[:cfg.eig_examples], y[:cfg.eig_examples])
    histories, rows, lam, sharp = {}, [], {}, {}
    for name in cfg.optimizers:
        torch.manual_seed(cfg.seed)  # the same initial network for every optimizer
        model = MLP(x.shape[1], 10, width=cfg.width, depth=cfg.depth, activation=cfg.activation)
        callbacks = [
            Evaluate({"train": data.train, "val": data.val}, every=max(steps // 30, 1)),
            CurvatureMonitor(eig_data, every=cfg.eig_every, tol=1e-3, seed=cfg.seed),  # edge and
            # radius from the optimizer
            Sharpness(eig_data, every=steps, measure="worst_case", rho=cfg.sharpness_rho),
            Checkpoint(every=cfg.checkpoint_every),
        ]
        res = fit(model, _optimizer(name, model, cfg), data.train, steps=steps,
                  loss_fn=F.cross_entropy, callbacks=callbacks, run=run, tag=name,
                  seed=cfg.seed, log_every=max(steps // 100, 1))
        histories[name] = res.history
        test = evaluate(model, F.cross_entropy, data.test)
        lam[name] = res.last("lambda_max")
        sharp[name] = res.last("sharpness_worst_case")
        rows.append({
            "optimizer": name, "steps": res.steps, "train_loss": res.last("train_loss"),
            "train_acc": res.last("train_acc"), "val_acc": res.last("val_acc"),
            "test_acc": test.get("acc"), "lambda_max": lam[name], "2/lr": 2 / cfg.lr,
            "sharpness": sharp[name],
            "passes/step": res.passes_per_step, "ms/step": 1e3 * res.time_per_step,
            "diverged": res.diverged,
        })

    run.add_section(
        "What ran",
        f"An MLP (40 -> {cfg.width} x {cfg.depth} {cfg.activation} -> 10) on MNIST-1D "
        f"({x.shape[0]} training examples, full batch), {steps} steps at lr {cfg.lr} with: "
        f"{', '.join(cfg.optimizers)}. SAM radius {cfg.rho}; GAM radius {cfg.gam_rho}, alpha "
        f"{cfg.gam_alpha}. The top Hessian eigenvalue of the training loss is measured every "
        f"{cfg.eig_every} steps on {eig_data[0].shape[0]} training examples (Lanczos).\n\n"
        "Every optimizer starts from the same initial network.",
    )
    run.add_section("Results per optimizer", "Final values; passes/step counts "
                    "forward-backward passes (closure calls).", table=rows)
    fig = plots.eigenvalue_plot(histories)
    run.add_section(
        "Top eigenvalue vs edge of stability",
        "Solid: λ_max of the training-loss Hessian. Dashed: 2/lr, the gradient-descent edge of "
        "stability. Dash-dot (SAM): the SAM edge lr·λ(1 + ρλ/‖g‖) = 2 with the measured "
        "full-batch gradient norm ‖g‖.",
        figures=[run.savefig(fig, "eigenvalues")],
    )
    fig = plots.curves(histories, ["loss", "val_acc"])
    run.add_section("Loss and accuracy", "Training loss (full batch) and validation accuracy.",
                    figures=[run.savefig(fig, "curves")])
    fig_lam = plots.bars({k: v for k, v in lam.items() if v is not None}, ylabel="final λ_max",
                         title="Final top eigenvalue")
    fig_sharp = plots.bars({k: v for k, v in sharp.items() if v is not None},
                           ylabel=f"worst-case sharpness (ρ={cfg.sharpness_rho})",
                           title="Final worst-case sharpness")
    run.add_section(
        "Final sharpness",
        "First figure: the top Hessian eigenvalue at the end. Second: worst-case sharpness "
        f"max over ||δ|| <= {cfg.sharpness_rho} of L(w+δ) - L(w) (projected gradient ascent), "
        "both on the same training examples as λ_max.",
        figures=[run.savefig(fig_lam, "lambda_max_bars"), run.savefig(fig_sharp, "sharpness")],
    )

    results: dict = {"lr": cfg.lr, "steps": steps, "2/lr": 2 / cfg.lr}
    for row in rows:
        for key in ("val_acc", "test_acc", "lambda_max", "sharpness", "passes/step"):
            results[f"{row['optimizer']}.{key}"] = row[key]
    return results
