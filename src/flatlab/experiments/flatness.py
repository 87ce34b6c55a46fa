r"""The flatness study: SGD, AdamW, SAM, ASAM, GAM, SAM+GAM on accuracy and flatness measures.

GAM (Zhang et al., CVPR 2023, arXiv 2303.03108) claims that bounding first-order flatness
``R1(θ) = ρ max_{‖δ‖≤ρ} ‖∇L(θ+δ)‖`` finds minima with a smaller top Hessian eigenvalue
``λ_max`` and trace ``tr H`` than SGD and SAM, and that it generalizes better, with SGD and with
AdamW; SAM+GAM is flatter than SAM. This experiment puts each optimizer through the same
protocol and measures the final models with :mod:`flatlab.curvature` and :mod:`flatlab.sparsity`.

Protocol (for every task = (data, model) and every optimizer):

1. Base learning rate: SGD (momentum, weight decay) and AdamW are trained on the grid
   ``sgd_lrs`` / ``adamw_lrs`` with seed 0; the rate with the best *validation* accuracy
   (ties: lower validation loss) is kept. The test split is never used to choose anything.
2. Radius: each sharpness-aware optimizer runs on its base's selected rate over its radius grid
   (``sam_rhos``, ``asam_rhos``, ``gam_rhos``), selected the same way.
3. Seeds: the selected setting is retrained with seeds ``1 .. seeds-1`` (seed 0 is the grid
   run), every run with the same step budget and batch size.
4. Measures on each final model, over ``measure_examples`` training examples (eval mode,
   mean cross-entropy): test accuracy / loss, generalization gap (train minus test accuracy),
   ``λ_max`` (Lanczos), ``tr H`` (Hutch++), worst-case sharpness ``max_{‖δ‖≤ρ} L(θ+δ) − L(θ)``
   and its adaptive form (``‖δ/|θ|‖ ≤ ρ_a``), first-order flatness, the gradient norm,
   hidden-layer activation sparsity, wall-clock per step and forward-backward passes per step.

Results are mean ± standard error over seeds. Every final measurement is also logged to
``metrics.jsonl`` as a record with ``tag="measure/<task>/<optimizer>/seed<s>"``, so
``flatlab compare RUN_DIR`` rebuilds the same table from the run folder alone.

``--set model=pkg.mod:factory`` and ``--set data=pkg.mod:factory`` run the study on a user's
own model and data: ``data`` returns a :class:`flatlab.data.Splits` (or any object with
``train``/``val``/``test`` ``(x, y)`` pairs, ``num_classes`` and ``input_shape``); ``model`` is
called as ``factory(input_shape, num_classes)`` and returns an ``nn.Module``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from flatlab.experiments._registry import ExperimentConfig, load_factory, register
from flatlab.report.summary import mean_se, summarize
from flatlab.train import Run, build_optimizer, evaluate, fit
from flatlab.train.rundir import ConfigError

OptimizerName = Literal["sgd", "adamw", "sam", "asam", "gam", "gam_adamw", "samgam"]
TaskName = Literal["mnist1d_mlp", "mnist1d_cnn", "digits_cnn"]

#: optimizer -> (flatlab.train name, base, radius grid field or None)
_OPTIMIZERS: dict[str, tuple[str, str, str | None]] = {
    "sgd": ("sgd", "sgd", None),
    "adamw": ("adamw", "adamw", None),
    "sam": ("sam", "sgd", "sam_rhos"),
    "asam": ("asam", "sgd", "asam_rhos"),
    "gam": ("gam", "sgd", "gam_rhos"),
    "gam_adamw": ("gam", "adamw", "gam_rhos"),
    "samgam": ("samgam", "sgd", "gam_rhos"),
}

#: the measures of the results table, in order: key -> column title
MEASURES: dict[str, str] = {
    "test_acc": "test acc",
    "test_loss": "test loss",
    "gen_gap": "gen. gap",
    "lambda_max": "λ_max",
    "trace": "tr H",
    "sharpness_worst": "worst-case sharp.",
    "sharpness_adaptive": "adaptive sharp.",
    "first_order_flatness": "1st-order flat.",
    "grad_norm": "‖∇L‖",
    "act_sparsity": "act. sparsity",
    "time_per_step": "s / step",
    "cpu_time_per_step": "CPU s / step",
    "passes_per_step": "passes / step",
}


class Config(ExperimentConfig):
    """Settings of ``flatlab run flatness``."""

    tasks: list[TaskName] = Field(
        ["mnist1d_mlp", "mnist1d_cnn", "digits_cnn"],
        description="(data, model) pairs; ignored when model/data factories are given")
    optimizers: list[OptimizerName] = Field(
        ["sgd", "adamw", "sam", "asam", "gam", "gam_adamw", "samgam"],
        description="optimizers compared (gam_adamw: GAM on an AdamW base)")
    seeds: int = Field(3, ge=1, description="seeds per selected setting (seed 0 = grid run)")
    steps: int = Field(600, ge=1, description="optimizer steps, the same for every optimizer")
    batch_size: int = Field(128, ge=1, description="minibatch size")
    mnist1d_n: int = Field(4000, ge=100, description="MNIST-1D examples (70/10/20 split)")
    sgd_lrs: list[float] = Field([0.05, 0.1], description="SGD learning-rate grid")
    adamw_lrs: list[float] = Field([1e-3, 3e-3], description="AdamW learning-rate grid")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (SGD coupled, AdamW "
                                "decoupled; AdamW uses 100x this value)")
    sam_rhos: list[float] = Field([0.02, 0.05], description="SAM radius grid")
    asam_rhos: list[float] = Field([0.2, 0.5], description="ASAM radius grid")
    gam_rhos: list[float] = Field([0.05, 0.2], description="GAM radius grid (rho of R1)")
    gam_alpha: float = Field(0.6, ge=0, le=1, description="GAM alpha (weight of g1 in h+)")
    gam_fd_rho: float = Field(0.02, ge=0, description="GAM finite-difference radius rho'")
    samgam_sam_rho: float = Field(0.05, ge=0, description="SAM radius inside SAM+GAM")
    measure_examples: int = Field(1000, ge=10, description="training examples for curvature")
    sharpness_rho: float = Field(0.05, ge=0, description="radius of worst-case sharpness "
                                 "and first-order flatness")
    adaptive_rho: float = Field(0.5, ge=0, description="radius of adaptive sharpness")
    trace_probes: int = Field(30, ge=3, description="Hutch++ products for tr H")
    model: str = Field("", description="module:function model factory "
                       "(input_shape, num_classes) -> nn.Module; needs data too")
    data: str = Field("", description="module:function returning flatlab.data.Splits")
    threads: int = Field(1, ge=0, description="torch CPU threads (0: torch's default)")


# ----------------------------------------------------------------------------- tasks


def _tasks(cfg: Config) -> dict[str, tuple[Any, Callable[[], nn.Module]]]:
    """Task name -> (splits, model factory). Models are built fresh (seeded) for every run."""
    from flatlab.data import digits, mnist1d
    from flatlab.models import build

    if cfg.model or cfg.data:
        if not (cfg.model and cfg.data):
            raise ConfigError("model and data overrides must be given together, got "
                              f"model={cfg.model!r}, data={cfg.data!r}")
        splits = load_factory(cfg.data, "data")()
        make = load_factory(cfg.model, "model")
        return {"custom": (splits, lambda: make(tuple(splits.input_shape), splits.num_classes))}
    n = 1000 if cfg.quick else cfg.mnist1d_n
    out: dict[str, tuple[Any, Callable[[], nn.Module]]] = {}
    for task in cfg.tasks:
        if task.startswith("mnist1d"):
            splits = mnist1d(n=n, seed=0)
            mlp = task == "mnist1d_mlp"
            name, kw = ("mlp", {"width": 64, "depth": 2}) if mlp else ("cnn1d", {})
        else:
            splits, name, kw = digits(size=8, seed=0), "small_cnn", {}
        out[task] = (splits, _builder(build, name, splits, kw))
    return out


def _builder(build: Callable, name: str, splits: Any, kw: dict) -> Callable[[], nn.Module]:
    return lambda: build(name, splits.input_shape, splits.num_classes, **kw)


# ----------------------------------------------------------------------------- one run


def _make_optimizer(cfg: Config, opt: str, model: nn.Module, lr: float, rho: float | None):
    name, base, _ = _OPTIMIZERS[opt]
    kw: dict[str, Any] = {"lr": lr}
    if base == "sgd":
        kw.update(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        kw.update(weight_decay=100 * cfg.weight_decay)
    if name != base:
        kw["base"] = base
        kw["rho"] = rho
        if name == "gam":
            kw.update(alpha=cfg.gam_alpha, fd_rho=cfg.gam_fd_rho)
        elif name == "samgam":
            kw.update(alpha=cfg.gam_alpha, sam_rho=cfg.samgam_sam_rho)
    return build_optimizer(name, model.parameters(), **kw)


def _train(cfg: Config, run: Run, task: str, splits: Any, make_model: Callable[[], nn.Module],
           opt: str, lr: float, rho: float | None, seed: int, tag: str):
    torch.manual_seed(seed)
    model = make_model()
    optimizer = _make_optimizer(cfg, opt, model, lr, rho)
    steps = 30 if cfg.quick else cfg.steps
    from flatlab.train import Evaluate

    res = fit(model, optimizer, splits.train, steps=steps, batch_size=cfg.batch_size,
              loss_fn=F.cross_entropy, run=run, tag=tag, seed=seed,
              log_every=max(1, steps // 50),
              callbacks=[Evaluate({"val": splits.val}, every=max(1, steps // 10))])
    val = evaluate(model, F.cross_entropy, splits.val)
    return model, res, val


def _score(val: dict[str, float]) -> tuple[float, float]:
    acc = val.get("acc", float("nan"))
    loss = val["loss"] if math.isfinite(val["loss"]) else float("inf")
    return (acc if math.isfinite(acc) else -1.0, -loss)


def measure(model: nn.Module, splits: Any, cfg: Config) -> dict[str, float]:
    """Every flatness measure of a trained classifier (see the module docstring)."""
    from flatlab.curvature import (
        first_order_flatness,
        gradient_norm,
        hessian_trace,
        top_eigenvalues,
        worst_case_sharpness,
    )
    from flatlab.sparsity import activation_sparsity

    loss_fn = F.cross_entropy
    m = min(cfg.measure_examples, splits.train[0].shape[0])
    data = (splits.train[0][:m], splits.train[1][:m])
    train = evaluate(model, loss_fn, splits.train)
    test = evaluate(model, loss_fn, splits.test)
    out = {"train_acc": train.get("acc", float("nan")), "train_loss": train["loss"],
           "test_acc": test.get("acc", float("nan")), "test_loss": test["loss"]}
    out["gen_gap"] = out["train_acc"] - out["test_acc"]
    out["lambda_max"] = float(top_eigenvalues(model, k=1, loss_fn=loss_fn, data=data).values[0])
    probes = 9 if cfg.quick else cfg.trace_probes
    out["trace"] = float(hessian_trace(model, loss_fn, data, probes=probes).value)
    steps = 3 if cfg.quick else 10
    out["sharpness_worst"] = float(worst_case_sharpness(
        model, loss_fn, data, rho=cfg.sharpness_rho, steps=steps).value)
    out["sharpness_adaptive"] = float(worst_case_sharpness(
        model, loss_fn, data, rho=cfg.adaptive_rho, adaptive=True, steps=steps).value)
    out["first_order_flatness"] = float(first_order_flatness(
        model, loss_fn, data, rho=cfg.sharpness_rho, steps=steps).value)
    out["grad_norm"] = float(gradient_norm(model, loss_fn, data).value)
    try:
        out["act_sparsity"] = float(activation_sparsity(model, data).mean)
    except ValueError:  # a model with no activation module the probe can find
        out["act_sparsity"] = float("nan")
    return out


# ----------------------------------------------------------------------------- the study


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results table: mean ± s.e. over seeds of every measure, per task and optimizer."""
    return summarize(records, MEASURES)


@register("flatness", Config,
          help="SGD/AdamW/SAM/ASAM/GAM/SAM+GAM: accuracy vs lambda_max, trace, sharpness")
def run(cfg: Config, run: Run) -> dict:
    from flatlab.report import plots

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tasks = _tasks(cfg)
    optimizers = list(dict.fromkeys(cfg.optimizers))
    grid_of = {"sgd": [cfg.sgd_lrs[0]] if cfg.quick else cfg.sgd_lrs,
               "adamw": [cfg.adamw_lrs[0]] if cfg.quick else cfg.adamw_lrs}
    seeds = 1 if cfg.quick else cfg.seeds
    measured: list[dict[str, Any]] = []
    chosen: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list]] = {}
    for task, (splits, make_model) in tasks.items():
        best_lr: dict[str, float] = {}
        for base in ("sgd", "adamw"):  # step 1: the base learning rates
            if not any(_OPTIMIZERS[o][1] == base for o in optimizers):
                continue
            results = []
            for i, lr in enumerate(grid_of[base]):
                model, res, val = _train(cfg, run, task, splits, make_model, base, lr, None, 0,
                                         f"{task}/{base}/lr{i}")
                results.append((_score(val), lr, model, res))
            best = max(results, key=lambda r: r[0])
            best_lr[base] = best[1]
            if base in optimizers:
                chosen.append({"task": task, "optimizer": base, "lr": best[1], "rho": None,
                               "val_acc": best[0][0]})
                _seed_runs(cfg, run, task, splits, make_model, base, best[1], None, best,
                           seeds, measured, curves)
        for opt in optimizers:  # step 2: the radii of the sharpness-aware optimizers
            _, base, grid_field = _OPTIMIZERS[opt]
            if grid_field is None:
                continue
            lr = best_lr[base]
            rhos = getattr(cfg, grid_field)
            rhos = rhos[:1] if cfg.quick else rhos
            results = []
            for i, rho in enumerate(rhos):
                model, res, val = _train(cfg, run, task, splits, make_model, opt, lr, rho, 0,
                                         f"{task}/{opt}/rho{i}")
                results.append((_score(val), rho, model, res))
            best = max(results, key=lambda r: r[0])
            chosen.append({"task": task, "optimizer": opt, "lr": lr, "rho": best[1],
                           "val_acc": best[0][0]})
            _seed_runs(cfg, run, task, splits, make_model, opt, lr, best[1], best, seeds,
                       measured, curves)
    for rec in measured:  # after the last fit: resume-safe logging
        run.log(step=rec.pop("_step"), **rec)
    rows = summary_rows(measured)
    _report(run, plots, chosen, rows, measured, curves)
    return _headline(rows)


def _seed_runs(cfg, run, task, splits, make_model, opt, lr, rho, best, seeds, measured, curves):
    """Measure the grid winner (seed 0) and retrain + measure seeds 1..seeds-1."""
    runs = [(0, best[2], best[3])]
    for seed in range(1, seeds):
        model, res, _ = _train(cfg, run, task, splits, make_model, opt, lr, rho, seed,
                               f"{task}/{opt}/seed{seed}")
        runs.append((seed, model, res))
    for seed, model, res in runs:
        rec = measure(model, splits, cfg)
        rec.update(time_per_step=res.time_per_step, cpu_time_per_step=res.cpu_time_per_step,
                   passes_per_step=res.passes_per_step,
                   lr=lr, rho=rho if rho is not None else 0.0)
        rec["tag"] = f"measure/{task}/{opt}/seed{seed}"
        rec["_step"] = res.steps
        measured.append(rec)
    curves.setdefault(task, {})[opt] = runs[0][2].history


def accuracy_vs_lambda_figure(measured: list[dict[str, Any]]):
    """One panel per task: test accuracy (%) against λ_max (log axis), a point per model,
    one colour per optimizer, from ``measure/<task>/<optimizer>/seed<s>`` records."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    groups: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for m in measured:
        _, task, opt, _ = m["tag"].split("/")
        groups.setdefault(task, {}).setdefault(opt, []).append(
            (m["lambda_max"], 100 * m["test_acc"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.8), squeeze=False)
    for ax, (task, by_opt) in zip(axes[0], groups.items()):
        for opt, pts in by_opt.items():
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=opt, s=28)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("λ_max (training loss Hessian)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _report(run, plots, chosen, rows, measured, curves) -> None:
    run.add_section(
        "Protocol",
        "Learning rates of SGD / AdamW chosen on validation accuracy (seed 0), then each "
        "sharpness-aware optimizer's radius at its base's rate; the winner is retrained with "
        "more seeds. Measures on the final models (training subset, eval mode). The test split "
        "chooses nothing.",
        table=chosen)
    run.add_section("Results (mean ± s.e. over seeds)",
                    "Rebuild this table from the run folder with `flatlab compare RUN_DIR`.",
                    table=rows)
    figures = []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig = accuracy_vs_lambda_figure(measured)
    figures.append(run.savefig(fig, "accuracy_vs_lambda_max"))
    for key in ("lambda_max", "trace", "sharpness_worst", "first_order_flatness", "test_acc"):
        for task in tasks:
            vals = {}
            for opt in dict.fromkeys(r["optimizer"] for r in rows if r["task"] == task):
                vals[opt] = mean_se([m[key] for m in measured
                                     if m["tag"].split("/")[1:3] == [task, opt]])[0]
            figures.append(run.savefig(plots.bars(vals, ylabel=MEASURES[key],
                                                  title=f"{task}: {MEASURES[key]}"),
                                       f"bars_{key}_{task}"))
    for task, hist in curves.items():
        figures.append(run.savefig(plots.curves(hist, ["loss", "val_acc"],
                                                title=f"{task}: training curves (seed 0)"),
                                   f"curves_{task}"))
    run.add_section("Figures", "Accuracy against λ_max per model; mean of each measure per "
                    "optimizer; training curves of the selected seed-0 runs.", figures=figures)


def _headline(rows: list[dict[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for r in rows:
        for col in ("λ_max", "test acc"):
            out[f"{r['task']}/{r['optimizer']} {col}"] = r[col]
    return out
