r"""``flatlab run sparsity``: finetuning a trained ReLU model with the sparsity modules.

Peng et al. (arXiv 2309.03004) offer their modules for finetuning as well as for training from
scratch: the ReLU is replaced by ``relu(h) + k relu(h)²/2`` with ``k`` ramped 0 → 1
(:class:`flatlab.sparsity.ReLUToJSquaredReLU`; exact ReLU at ``k = 0``), optionally with the
zeroth bias and the finetuning form of the restricted LayerNorm. Protocol, per paired seed:

1. **base**: a pre-LN :class:`~flatlab.models.ResidualMLP` (ReLU) trained ``epochs`` epochs of
   SGD (``finetune_lr``, batch ``batch``) on the synthetic teacher-student task;
2. from the same base weights, ``finetune_epochs`` more epochs (same lr, same data order in
   every arm) of

   * **continued**: the ReLU model as it is (the control);
   * **ramp**: :func:`flatlab.sparsity.sparsify` ``activation="ramp"`` over ``ramp_epochs``;
   * **ramp + zb + rLN**: the ramp, the zeroth bias at the MLP output (``MLP(LN(x)) + b0``, the
     authors' final code) and ``layernorm="finetune"`` (the authors' finetuning recipe);

   with :func:`flatlab.sparsity.constrain_` after every step.

Measured on the test split (eval mode): the zero-derivative fraction (mean over blocks) and the
test accuracy, at the base and after finetuning. Claims through :mod:`flatlab.report.stats`
(paired over seeds): each sparsified arm is sparser than the continued control, and its test
accuracy is not lower by more than ``acc_margin`` (a non-inferiority gate).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

from flatlab.models import ResidualMLP
from flatlab.report.stats import Gate, paired_difference
from flatlab.sparsity import activation_sparsity, constrain_, sparsify
from flatlab.train import Callback, Evaluate, build_optimizer, fit

ARMS = {"continued": None,
        "ramp": {"activation": "ramp"},
        "ramp + zb + rLN": {"activation": "ramp", "zeroth_bias": "output",
                            "layernorm": "finetune"}}


class Constrain(Callback):
    """Apply the sparsity modules' after-step constraints (clips, clamps, ramps) every step."""

    def __init__(self) -> None:
        super().__init__(every=1)

    def on_step(self, state: Any) -> None:
        constrain_(state.model, state.step)


def _train(run: Any, tag: str, model: torch.nn.Module, data: Any, *, lr: float, batch: int,
           epochs: int, seed: int, constrain: bool) -> dict[str, float]:
    spe = math.ceil(len(data.train[1]) / batch)
    opt = build_optimizer("sgd", model.parameters(), lr=lr)
    cbs = [Constrain()] if constrain else []
    cbs.append(Evaluate({"test": data.test}, every=spe))
    res = fit(model, opt, data.train, steps=epochs * spe, batch_size=batch,
              loss_fn=F.cross_entropy, callbacks=cbs, run=run, tag=tag, seed=seed,
              log_every=spe, progress=False)
    sp = activation_sparsity(model, data.test)
    return {"diverged": bool(res.diverged), "acc": float(res.last("test_acc", math.nan)),
            "sparsity": sp.mean}


def finetune_study(cfg: Any, run: Any, data: Any) -> tuple[list[dict], list[dict], dict]:
    """Base runs, then each arm of :data:`ARMS` from the base weights; rows, verdicts, results."""
    seeds = [cfg.seed + i for i in range(cfg.finetune_seeds)]
    spe = math.ceil(len(data.train[1]) / cfg.batch)
    per: dict[str, list[dict]] = {"base": [], **{a: [] for a in ARMS}}
    rows = []
    for s in seeds:
        torch.manual_seed(s)
        model = ResidualMLP(data.train[0].shape[1], data.num_classes, width=cfg.width,
                            depth=cfg.depth)
        base = _train(run, f"ft-base-s{s}", model, data, lr=cfg.finetune_lr, batch=cfg.batch,
                      epochs=cfg.epochs, seed=s, constrain=False)
        per["base"].append(base)
        for arm, kw in ARMS.items():
            m = copy.deepcopy(model)
            if kw:
                sparsify(m, ramp_steps=cfg.ramp_epochs * spe, **kw)
            out = _train(run, f"ft-{arm.replace(' ', '')}-s{s}", m, data, lr=cfg.finetune_lr,
                         batch=cfg.batch, epochs=cfg.finetune_epochs, seed=s + 10_000,
                         constrain=bool(kw))
            per[arm].append(out)
            rows.append({"seed": s, "arm": arm, "base sparsity": round(base["sparsity"], 4),
                         "base acc": round(base["acc"], 4),
                         "final sparsity": round(out["sparsity"], 4),
                         "sparsity gained (pts)": round(100 * (out["sparsity"] - base["sparsity"]),
                                                        2),
                         "final acc": round(out["acc"], 4),
                         "acc change (pts)": round(100 * (out["acc"] - base["acc"]), 2),
                         "diverged": out["diverged"]})
    verdicts, res = [], {}
    ctrl = per["continued"]
    for arm in list(ARMS)[1:]:
        pairs = [(a, c) for a, c in zip(per[arm], ctrl)
                 if not (a["diverged"] or c["diverged"]) and math.isfinite(a["sparsity"])]
        if len(pairs) < 2:
            verdicts.append({"claim": f"{arm}: sparser than continued training",
                             "verdict": f"not shown at this scale: {len(pairs)} finite pairs",
                             "passed": False})
            continue
        sparser = Gate(f"{arm}: sparser than continued training (pts)", "greater").check(
            paired_difference([100 * a["sparsity"] for a, _ in pairs],
                              [100 * c["sparsity"] for _, c in pairs]))
        kept = Gate(f"{arm}: test accuracy not lower than continued training by more than "
                    f"{cfg.acc_margin:g} pts", "greater", -cfg.acc_margin).check(
            paired_difference([100 * a["acc"] for a, _ in pairs],
                              [100 * c["acc"] for _, c in pairs]))
        for v in (sparser, kept):
            verdicts.append(v.as_row())
        res[f"finetune.{arm}.sparser"] = sparser.passed
        res[f"finetune.{arm}.acc_kept"] = kept.passed
        res[f"finetune.{arm}.sparsity_minus_control_pts"] = sparser.interval.estimate
        res[f"finetune.{arm}.acc_minus_control_pts"] = kept.interval.estimate
    return rows, verdicts, res
