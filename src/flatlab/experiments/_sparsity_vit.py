r"""``flatlab run sparsity``: the modules in a tiny pre-LN ViT, compared at matched accuracy.

Peng et al.'s headline numbers (arXiv 2309.03004) are on ViT-B/16 and T5. At CPU scale: a
:class:`flatlab.models.ViT` (pre-LN blocks, MLP ``W_2 act(W_1 LN(z) + b_1) + b_2``) over
``40 / patch`` patches of MNIST-1D, trained with AdamW (``vit_lr``, batch ``batch``) for
``vit_epochs`` epochs, in three variants built from the same initial weights per seed:

* **ReLU**;
* **J-SquaredReLU** (:func:`flatlab.sparsity.sparsify` ``activation="jsrelu"``);
* **J-SquaredReLU + zeroth bias** (``zeroth_bias="output"``, ``MLP(LN(z)) + b0`` with one
  ``b0`` row per token, clipped to ``0.1 |γ|``, the authors' final code).

Sparsity is the zero-derivative fraction of the MLP pre-activations over all tokens of the test
split (eval mode), mean over blocks, logged every epoch. Because sparsity also grows with
training progress, variants are compared **at matched accuracy**: per seed, the target is the
lowest of the variants' best test accuracies, and each variant's sparsity is read at the first
epoch where its test accuracy reaches that target. The claims (paired over seeds,
:mod:`flatlab.report.stats`): each modified variant is sparser than ReLU at matched accuracy.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from flatlab.experiments._sparsity_finetune import Constrain
from flatlab.models import ViT
from flatlab.report.stats import Gate, paired_difference
from flatlab.sparsity import sparsify
from flatlab.train import ActivationSparsity, Evaluate, build_optimizer, fit

VARIANTS = {"ReLU": None, "J-SquaredReLU": {"activation": "jsrelu"},
            "J-SquaredReLU + zeroth bias": {"activation": "jsrelu", "zeroth_bias": "output"}}


def _vit(cfg: Any, seed: int) -> ViT:
    torch.manual_seed(seed)
    return ViT((40,), 10, patch_size=cfg.patch, dim=cfg.vit_dim, depth=cfg.depth,
               heads=cfg.vit_heads)


def _evaluations(history: list[dict]) -> list[dict]:
    """The records of ``history`` holding both ``test_acc`` and ``act_sparsity``, in order."""
    return [r for r in history if "test_acc" in r and "act_sparsity" in r]


def at_accuracy(history: list[dict], target: float) -> float:
    """``act_sparsity`` at the first record of ``history`` whose ``test_acc`` reaches
    ``target`` (NaN if none does): sparsity compared at matched accuracy."""
    return next((float(r["act_sparsity"]) for r in _evaluations(history)
                 if r["test_acc"] >= target - 1e-12), math.nan)


def vit_study(cfg: Any, run: Any, data: Any) -> tuple[list[dict], list[dict], dict]:
    """All variants over ``cfg.vit_seeds`` paired seeds: per-run rows, verdicts, results."""
    seeds = [cfg.seed + i for i in range(cfg.vit_seeds)]
    spe = math.ceil(len(data.train[1]) / cfg.batch)
    curves: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    for s in seeds:
        for name, kw in VARIANTS.items():
            model = _vit(cfg, s)
            if kw:
                sparsify(model, example=data.train[0][:2], **kw)
            opt = build_optimizer("adamw", model.parameters(), lr=cfg.vit_lr, weight_decay=0.0)
            cbs = [Constrain()] if kw else []
            cbs += [ActivationSparsity(data.test, every=spe), Evaluate({"test": data.test},
                                                                       every=spe)]
            res = fit(model, opt, data.train, steps=cfg.vit_epochs * spe, batch_size=cfg.batch,
                      loss_fn=F.cross_entropy, callbacks=cbs, run=run,
                      tag=f"vit-{name.replace(' ', '')}-s{s}", seed=s, log_every=spe,
                      progress=False)
            curves[name].append(_evaluations(res.history) if not res.diverged else [])
    rows, per = [], {v: [] for v in VARIANTS}
    for i, s in enumerate(seeds):
        best = {v: max((r["test_acc"] for r in curves[v][i]), default=math.nan)
                for v in VARIANTS}
        target = min(best.values())
        for v in VARIANTS:
            c = curves[v][i]
            sp = at_accuracy(c, target)
            per[v].append(sp)
            rows.append({"seed": s, "variant": v, "best test acc": round(best[v], 4),
                         "final test acc": round(c[-1]["test_acc"], 4) if c else math.nan,
                         "final sparsity": round(c[-1]["act_sparsity"], 4) if c else math.nan,
                         "matched acc": round(target, 4), "sparsity at matched acc":
                         round(sp, 4)})
    verdicts, res = [], {}
    for v in list(VARIANTS)[1:]:
        pairs = [(a, b) for a, b in zip(per[v], per["ReLU"]) if math.isfinite(a + b)]
        if len(pairs) < 2:
            verdicts.append({"claim": f"{v} sparser than ReLU at matched accuracy",
                             "verdict": f"not shown at this scale: {len(pairs)} finite pairs",
                             "passed": False})
            continue
        verdict = Gate(f"{v} sparser than ReLU at matched accuracy (pts)", "greater").check(
            paired_difference([100 * a for a, _ in pairs], [100 * b for _, b in pairs]))
        verdicts.append(verdict.as_row())
        res[f"vit.{v}.sparser"] = verdict.passed
        res[f"vit.{v}.minus_relu_pts"] = verdict.interval.estimate
    return rows, verdicts, res
