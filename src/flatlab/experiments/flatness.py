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
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from flatlab.experiments._flatness_claims import CLAIMS, claim_rows, claim_verdicts
from flatlab.experiments._flatness_tasks import REFERENCES, Task, build_task
from flatlab.experiments._registry import ExperimentConfig, load_factory, register
from flatlab.report.summary import mean_se, summarize
from flatlab.rundir import ConfigError
from flatlab.train import FitResult, Run, build_optimizer, evaluate, fit

OptimizerName = Literal["sgd", "adamw", "sam", "asam", "gam", "gam_adamw", "samgam", "sam_fd"]
TaskName = Literal["mnist1d_mlp", "mnist1d_cnn", "digits_cnn", "cifar10_resnet18", "cifar100_wrn"]

#: optimizer -> (flatlab.train name, base, the Config field of its tuning grid or None); in
#: the order they are tuned (SAM before SAM+GAM, which runs at SAM's selected radius)
_OPTIMIZERS: dict[str, tuple[str, str, str | None]] = {
    "sgd": ("sgd", "sgd", "sgd_lrs"),
    "adamw": ("adamw", "adamw", "adamw_lrs"),
    "sam": ("sam", "sgd", "sam_rhos"),
    "asam": ("asam", "sgd", "asam_rhos"),
    "gam": ("gam", "sgd", "gam_rhos"),
    "gam_adamw": ("gam", "adamw", "gam_rhos"),
    "samgam": ("samgam", "sgd", "samgam_alphas"),
    "sam_fd": ("sam", "sgd", None),  # control: SAM at GAM's rho', not tuned
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
    "steps": "steps",
    "cpu_time": "CPU s",
    "val_change_last20": "Δ val acc, last 20%",
}

__all__ = ["CLAIMS", "Config", "MEASURES", "accuracy_vs_lambda_figure", "baseline_rows",
           "claim_rows", "claim_verdicts", "measure", "run", "summary_rows",
           "val_change_last20"]


class Config(ExperimentConfig):
    """Settings of ``flatlab run flatness``."""

    tasks: list[TaskName] = Field(
        ["mnist1d_mlp", "mnist1d_cnn", "digits_cnn"],
        description="(data, model) pairs; ignored when model/data factories are given; the "
        "CIFAR tasks need data_dir")
    optimizers: list[OptimizerName] = Field(
        ["sgd", "adamw", "sam", "asam", "gam", "gam_adamw", "samgam", "sam_fd"],
        description="optimizers compared (gam_adamw: GAM on AdamW; sam_fd: SAM at GAM's "
        "rho', the control that isolates GAM's term)")
    seeds: int = Field(5, ge=1, description="paired seeds per selected setting (seed 0 = grid "
                       "run); seed s: same initialization and data order for every optimizer")
    steps: int | None = Field(None, ge=1, description="optimizer steps, the same for every "
                              "optimizer; None: the task's budget (MLP 6000, CNNs 3000, CIFAR "
                              "cifar_epochs)")
    cifar_epochs: int = Field(200, ge=1, description="CIFAR tasks: epochs (GAM's recipe)")
    batch_size: int = Field(128, ge=1, description="minibatch size")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="learning-rate schedule over the steps (GAM's recipe: cosine)")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="training loss label smoothing "
                                   "(GAM's recipe: 0.1); measures use plain cross-entropy")
    sgd_lrs: list[float] = Field([0.05, 0.1], description="SGD learning-rate grid")
    adamw_lrs: list[float] = Field([1e-3, 3e-3], description="AdamW learning-rate grid")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description="weight decay (SGD coupled, AdamW "
                                "decoupled; AdamW uses 100x this value)")
    sam_rhos: list[float] = Field([0.02, 0.05], description="SAM radius grid")
    asam_rhos: list[float] = Field([0.2, 0.5], description="ASAM radius grid")
    gam_rhos: list[float] = Field([0.05, 0.2], description="GAM (Algorithm 2) radius grid")
    gam_alpha: float = Field(0.6, ge=0, le=1, description="GAM Alg. 2 alpha (weight of g1 in "
                             "h+; paper's CIFAR-100 ResNet value)")
    gam_beta: float = Field(0.5, ge=0, le=1, description="GAM Alg. 2 beta (weight of g0 in h-)")
    gam_gamma: float = Field(0.03, ge=0, description="GAM Alg. 2 gamma (orthogonal correction)")
    gam_fd_rho: float = Field(0.02, ge=0, description="GAM finite-difference radius rho' (also "
                              "the radius of the sam_fd control)")
    samgam_alphas: list[float] = Field(
        [0.1, 0.5], description="SAM+GAM (Algorithm 1) alpha grid: weight of rho H g^ "
        "(not Algorithm 2's alpha)")
    samgam_rho: float = Field(0.2, ge=0, description="SAM+GAM: rho of first-order flatness")
    samgam_sam_rho: float | None = Field(
        None, description="SAM radius inside SAM+GAM; None: SAM's selected radius (same-radius "
        "comparison)")
    equal_cpu: list[OptimizerName] = Field(
        ["gam"], description="for each, SGD is retrained for that optimizer's CPU time "
        "(steps x measured CPU-time ratio): the equal-CPU-time baseline")
    measure_examples: int = Field(1000, ge=10, description="training examples for curvature")
    sharpness_rho: float = Field(0.05, ge=0, description="radius of worst-case sharpness "
                                 "and first-order flatness")
    adaptive_rho: float = Field(0.5, ge=0, description="radius of adaptive sharpness")
    trace_probes: int = Field(30, ge=4, description="Hessian-vector products of the tr H "
                              "estimate (XTrace, hessian_trace's default: at least 4)")
    sharpness_steps: int = Field(10, ge=1, description="projected-ascent steps of the worst-case "
                                 "and adaptive sharpness and of first-order flatness")
    cifar_size: Literal["paper", "tiny"] = Field(
        "paper", description="CIFAR models: the paper's, or tiny (one block per stage at 1/16 "
        "width: a plumbing check)")
    data_dir: str = Field("", description="CIFAR tasks: folder with cifar-10-batches-py / "
                          "cifar-100-python")
    model: str = Field("", description="module:function model factory "
                       "(input_shape, num_classes) -> nn.Module; needs data too")
    data: str = Field("", description="module:function returning flatlab.data.Splits")


# ----------------------------------------------------------------------------- tasks


def _tasks(cfg: Config) -> dict[str, Task]:
    """Task name -> :class:`Task`. Models are built fresh (seeded) for every run."""
    if cfg.model or cfg.data:
        if not (cfg.model and cfg.data):
            raise ConfigError("model and data overrides must be given together, got "
                              f"model={cfg.model!r}, data={cfg.data!r}")
        splits = load_factory(cfg.data, "data")()
        make = load_factory(cfg.model, "model")
        return {"custom": Task(splits, lambda: make(tuple(splits.input_shape),
                                                    splits.num_classes),
                               cfg.steps or 3000)}
    return {task: build_task(task, cfg) for task in cfg.tasks}


# ----------------------------------------------------------------------------- one run


def _make_optimizer(cfg: Config, opt: str, model: nn.Module, lr: float, knob: float | None,
                    sam_rho: float | None):
    """``knob`` is the tuned value: the radius, or SAM+GAM's alpha."""
    name, base, _ = _OPTIMIZERS[opt]
    kw: dict[str, Any] = {"lr": lr}
    if base == "sgd":
        kw.update(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        kw.update(weight_decay=100 * cfg.weight_decay)
    if name != base:
        kw["base"] = base
        if opt == "sam_fd":
            kw["rho"] = cfg.gam_fd_rho
        elif name == "gam":
            kw.update(rho=knob, alpha=cfg.gam_alpha, beta=cfg.gam_beta, gamma=cfg.gam_gamma,
                      fd_rho=cfg.gam_fd_rho)
        elif name == "samgam":
            kw.update(rho=cfg.samgam_rho, alpha=knob, sam_rho=sam_rho)
        else:
            kw["rho"] = knob
    return build_optimizer(name, model.parameters(), **kw)


@dataclass
class Trained:
    """One training run of the study: the trained ``model``, ``fit``'s result, the final
    validation metrics ``val`` (``acc``, ``loss``) and the ``seed`` (initialization and data
    order)."""

    model: nn.Module
    fit: FitResult
    val: dict[str, float]
    seed: int


def _train(cfg: Config, run: Run, task: Task, opt: str, lr: float, knob: float | None,
           seed: int, tag: str, sam_rho: float | None = None,
           steps: int | None = None) -> Trained:
    from flatlab.train import Evaluate

    torch.manual_seed(seed)  # seed s: the same initial weights for every optimizer
    model = task.make_model()
    optimizer = _make_optimizer(cfg, opt, model, lr, knob, sam_rho)
    steps = steps or task.steps
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
                 if cfg.schedule == "cosine" else None)
    ls = cfg.label_smoothing

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, label_smoothing=ls)

    res = fit(model, optimizer, task.splits.train, steps=steps, batch_size=cfg.batch_size,
              loss_fn=loss_fn, run=run, tag=tag, seed=seed, scheduler=scheduler,
              log_every=max(1, steps // 50),  # seed s: the same data order for every optimizer
              callbacks=[Evaluate({"val": task.splits.val}, every=max(1, steps // 20))])
    return Trained(model, res, evaluate(model, F.cross_entropy, task.splits.val), seed)


def _score(val: dict[str, float]) -> tuple[float, float]:
    acc = val.get("acc", float("nan"))
    loss = val["loss"] if math.isfinite(val["loss"]) else float("inf")
    return (acc if math.isfinite(acc) else -1.0, -loss)


def val_change_last20(history: list[dict[str, Any]]) -> float:
    """Validation accuracy at the end minus at 80% of the steps (the plateau check)."""
    pts = [(h["step"], h["val_acc"]) for h in history if "val_acc" in h]
    if len(pts) < 2:
        return float("nan")
    last = pts[-1]
    at80 = min(pts, key=lambda p: abs(p[0] - 0.8 * last[0]))
    return float(last[1] - at80[1])


def measure(model: nn.Module, splits: Any, cfg: Config,
            parallel: Any = None) -> dict[str, float]:
    """Every flatness measure of a trained classifier (see the module docstring).

    ``parallel``: the run's :class:`~flatlab.train.parallel.DataParallel` group at several
    ranks; each rank then measures its shard and the values are the full data's.
    """
    from flatlab.curvature import (
        first_order_flatness,
        gradient_norm,
        hessian_trace,
        top_eigenvalues,
        worst_case_sharpness,
    )
    from flatlab.sparsity import activation_sparsity
    from flatlab.train.parallel import measured

    loss_fn = F.cross_entropy
    m = min(cfg.measure_examples, splits.train[0].shape[0])
    data, across = measured((splits.train[0][:m], splits.train[1][:m]), parallel)
    train = evaluate(model, loss_fn, *measured(splits.train, parallel))
    test = evaluate(model, loss_fn, *measured(splits.test, parallel))
    out = {"train_acc": train.get("acc", float("nan")), "train_loss": train["loss"],
           "test_acc": test.get("acc", float("nan")), "test_loss": test["loss"]}
    out["gen_gap"] = out["train_acc"] - out["test_acc"]
    kw = {"distributed": across}
    # the random start and XTrace, pinned: the committed study and its resumable runs were
    # measured with them (the default start mixes in the gradient; the "auto" trace would
    # take the exact route on these MLPs)
    out["lambda_max"] = float(top_eigenvalues(model, loss_fn, data, 1, init="random",
                                              **kw).values[0])
    out["trace"] = float(hessian_trace(model, loss_fn, data, probes=cfg.trace_probes,
                                       method="xtrace", **kw).value)
    steps = cfg.sharpness_steps
    out["sharpness_worst"] = float(worst_case_sharpness(
        model, loss_fn, data, rho=cfg.sharpness_rho, steps=steps, **kw).value)
    out["sharpness_adaptive"] = float(worst_case_sharpness(
        model, loss_fn, data, rho=cfg.adaptive_rho, adaptive=True, steps=steps, **kw).value)
    out["first_order_flatness"] = float(first_order_flatness(
        model, loss_fn, data, rho=cfg.sharpness_rho, steps=steps, **kw).value)
    out["grad_norm"] = float(gradient_norm(model, loss_fn, data, **kw).value)
    try:
        out["act_sparsity"] = float(activation_sparsity(model, data, **kw).mean)
    except ValueError:  # a model with no activation module the probe can find
        out["act_sparsity"] = float("nan")
    return out


# ----------------------------------------------------------------------------- the study


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results table: mean ± s.e. over seeds of every measure, per task and optimizer."""
    return summarize(records, MEASURES)


def quick(cfg: Config) -> dict[str, Any]:
    """``--quick``'s preset: 30 steps, one seed, the first value of every grid, cheap measures
    and tiny CIFAR models (a plumbing check, not a result)."""
    grids = ["sgd_lrs", "adamw_lrs"] + [f for _, _, f in _OPTIMIZERS.values() if f]
    return {"steps": 30, "seeds": 1, "trace_probes": 9, "sharpness_steps": 3,
            "cifar_size": "tiny", **{g: getattr(cfg, g)[:1] for g in dict.fromkeys(grids)}}


@register("flatness", Config,
          help="SGD/AdamW/SAM/ASAM/GAM/SAM+GAM: accuracy vs lambda_max, trace, sharpness",
          quick=quick, summary_rows=summary_rows, joined_rows=claim_rows)
def run(cfg: Config, run: Run) -> dict:
    from flatlab.report import plots

    tasks = _tasks(cfg)
    # SAM before SAM+GAM: SAM+GAM runs at SAM's selected radius
    order = list(_OPTIMIZERS)
    optimizers = sorted(dict.fromkeys(cfg.optimizers), key=order.index)
    seeds = cfg.seeds
    measured: list[dict[str, Any]] = []
    chosen: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list]] = {}

    for name, task in tasks.items():
        best_lr: dict[str, float] = {}
        sam_rho = cfg.samgam_sam_rho
        if sam_rho is None and "sam" not in optimizers:
            sam_rho = cfg.sam_rhos[0]
        for opt in optimizers:
            _, base, field = _OPTIMIZERS[opt]
            if opt != base and base not in best_lr:  # the base's rate, chosen on validation
                lrs = cfg.sgd_lrs if base == "sgd" else cfg.adamw_lrs
                best_lr[base] = _best([(lr, _train(cfg, run, task, base, lr, None, 0,
                                                   f"{name}/{base}/lr{i}"))
                                       for i, lr in enumerate(lrs)])[0]
            values = getattr(cfg, field) if field else [None]
            if opt == base:  # step 1: the learning rate on the base's grid
                results = [(v, _train(cfg, run, task, opt, v, None, 0, f"{name}/{opt}/lr{i}"))
                           for i, v in enumerate(values)]
            else:  # step 2: the radius (SAM+GAM: alpha) at the base's selected rate
                results = [(v, _train(cfg, run, task, opt, best_lr[base], v, 0,
                                      f"{name}/{opt}/k{i}", sam_rho))
                           for i, v in enumerate(values)]
            value, best = _best(results)
            lr = value if opt == base else best_lr[base]
            knob = None if opt == base else value
            if opt == base:
                best_lr[opt] = lr
            if opt == "sam" and cfg.samgam_sam_rho is None:
                sam_rho = value
            chosen.append({"task": name, "optimizer": opt, "lr": lr, "tuned": field or "-",
                           "grid": getattr(cfg, field) if field else "-", "selected": value,
                           "sam_rho": sam_rho if opt == "samgam" else "",
                           "val_acc": _score(best.val)[0]})
            runs = _seed_runs(cfg, run, name, task, opt, lr, knob, best, seeds,
                              sam_rho if opt == "samgam" else None, measured)
            curves.setdefault(name, {})[opt] = runs[0].fit.history
        _equal_cpu(cfg, run, name, task, best_lr, seeds, measured, curves)
    for rec in measured:  # after the last fit: resume-safe logging
        run.log(step=rec.pop("_step"), **rec)
    rows = summary_rows(measured)
    _report(run, plots, chosen, rows, measured, curves)
    return _headline(rows)


def _best(results: list[tuple[Any, Trained]]) -> tuple[Any, Trained]:
    """The ``(grid value, run)`` with the best validation accuracy (ties: lower validation
    loss)."""
    return max(results, key=lambda r: _score(r[1].val))


def _seed_runs(cfg, run, name, task, opt, lr, knob, best: Trained, seeds, sam_rho, measured,
               label=None, steps=None) -> list[Trained]:
    """Measure the grid winner (seed 0) and retrain + measure seeds 1..seeds-1."""
    label = label or opt
    runs = [best] + [_train(cfg, run, task, opt, lr, knob, seed, f"{name}/{label}/seed{seed}",
                            sam_rho, steps) for seed in range(1, seeds)]
    for t in runs:
        res = t.fit
        rec = measure(t.model, task.splits, cfg, run.parallel)
        rec.update(time_per_step=res.time_per_step, cpu_time_per_step=res.cpu_time_per_step,
                   passes_per_step=res.passes_per_step, steps=res.steps,
                   cpu_time=res.cpu_time_per_step * res.steps,
                   val_change_last20=val_change_last20(res.history),
                   lr=lr, rho=float(knob) if knob is not None else 0.0)
        rec["tag"] = f"measure/{name}/{label}/seed{t.seed}"
        rec["_step"] = res.steps
        measured.append(rec)
    return runs


def _equal_cpu(cfg, run, name, task, best_lr, seeds, measured, curves) -> None:
    """SGD retrained for each ``cfg.equal_cpu`` optimizer's CPU time (label ``sgd@<opt>``)."""
    def cpu(opt: str) -> float:
        vals = [m["cpu_time_per_step"] for m in measured if m["tag"].split("/")[1:3]
                == [name, opt]]
        return sum(vals) / len(vals) if vals else float("nan")

    for opt in cfg.equal_cpu:
        ratio = cpu(opt) / cpu("sgd")
        if "sgd" not in best_lr or not math.isfinite(ratio):
            continue
        steps = max(1, round(task.steps * ratio))
        label = f"sgd@{opt}"
        first = _train(cfg, run, task, "sgd", best_lr["sgd"], None, 0, f"{name}/{label}/seed0",
                       steps=steps)
        runs = _seed_runs(cfg, run, name, task, "sgd", best_lr["sgd"], None, first, cfg.seeds,
                          None, measured, label=label, steps=steps)
        curves.setdefault(name, {})[label] = runs[0].fit.history


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


def baseline_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SGD's test accuracy (mean, 95% t CI over seeds) beside the published reference level,
    and the plateau check: validation accuracy change over the last 20% of the steps."""
    from flatlab.report.stats import mean_interval
    from flatlab.report.summary import group_measurements

    out = []
    for (task, opt), recs in group_measurements(records).items():
        if opt != "sgd" or task not in REFERENCES:
            continue
        ref, source = REFERENCES[task]
        acc = mean_interval([100 * r["test_acc"] for r in recs])
        change = mean_se(100 * r.get("val_change_last20", float("nan")) for r in recs)
        out.append({"task": task, "SGD test acc (%)": acc.format(3),
                    "reference (%)": 100 * ref, "source": source,
                    "within 2 points": bool(acc.estimate >= 100 * ref - 2),
                    "val acc change, last 20% of steps (points)":
                        f"{change[0]:+.2f} ± {change[1]:.2f}"})
    return out


def _report(run, plots, chosen, rows, measured, curves) -> None:
    run.add_section(
        "Protocol",
        "Every optimizer gets a grid of the same size, chosen on validation accuracy with "
        "seed 0: SGD / AdamW their learning rate, then each sharpness-aware optimizer its "
        "radius (SAM+GAM its alpha, at SAM's selected radius) at its base's selected rate; "
        "sam_fd is SAM at GAM's rho' (the control, not tuned). The winner is retrained on "
        "paired seeds (same initialization and data order for every optimizer). Measures on "
        "the final models (training subset, eval mode). The test split chooses nothing.",
        table=chosen)
    run.add_section("Baselines against the published reference", table=baseline_rows(measured))
    run.add_section("Claims (paired differences over seeds, 95% t CI)",
                    " ".join(v.sentence() for _, v in claim_verdicts(measured)),
                    table=claim_rows(measured))
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
