r"""Target 5 of ``flatlab run sparsity``: derivative sparsity vs output sparsity.

Peng et al.'s explanation (arXiv 2309.03004) says training under flatness pushes
pre-activations into the activation's **zero-derivative** region; the "lazy neuron" reading
(Li et al., arXiv 2210.06313) counts **zero outputs**. With ReLU the two coincide. The shifted
S-shaped activation :class:`flatlab.sparsity.ShiftedSquaredS` separates them: its flat band
``|h − s_x| <= 1.5`` excludes ``h = 0`` for ``|s_x| = 1.6``, and its output on the band is
``s_y = ±1.6``, not 0.

For each of the four ``(s_x, s_y)`` sign combinations and each paired seed (same init draw,
same data order), a pre-LN :class:`~flatlab.models.ResidualMLP` with that activation in every
block trains with SGD on the synthetic teacher-student task of targets 1-3, at the setting where
ReLU sparsity emerges (target 1: ``top_lr``, batch ``batch``, ``epochs`` epochs), beside a ReLU
reference run. On the held-out split (eval mode) we measure

* zero derivative: the fraction of pre-activation entries in the flat band (derivative sparsity,
  :func:`flatlab.sparsity.activation_sparsity` through the module's ``zero_derivative``);
* ``near-zero output``: the fraction of outputs with ``|f(h)| <= band_output_tol``;

at initialization and after training. Each claim is a paired difference final − init over
seeds through :mod:`flatlab.report.stats`: "the band fraction rises" (the note's pass rule, one
gate per sign combination) and, as the contrast, "the near-zero-output fraction rises" (what a
zero-output mechanism would predict).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from flatlab.models import ResidualMLP
from flatlab.report.stats import Gate, paired_difference
from flatlab.sparsity import ShiftedSquaredS, activation_sparsity
from flatlab.train import Evaluate, build_optimizer, fit

SIGNS = ((1.6, 1.6), (1.6, -1.6), (-1.6, 1.6), (-1.6, -1.6))


def train_band(cfg: Any, run: Any, shifts: tuple[float, float] | None, seed: int,
               data: Any) -> dict:
    """One run (``shifts=None``: the ReLU reference): measure, train with SGD, measure again."""
    train, test = data.train, data.test
    torch.manual_seed(seed)
    act: Any = "relu" if shifts is None else (lambda: ShiftedSquaredS(*shifts))
    model = ResidualMLP(train[0].shape[1], data.num_classes, width=cfg.width, depth=cfg.depth,
                        activation=act)
    tol = cfg.band_output_tol
    before = activation_sparsity(model, test, output_tol=tol)
    spe = math.ceil(len(train[1]) / cfg.batch)
    opt = build_optimizer("sgd", model.parameters(), lr=cfg.top_lr)
    name = "relu" if shifts is None else f"x{shifts[0]:+g}-y{shifts[1]:+g}"
    res = fit(model, opt, train, steps=cfg.epochs * spe, batch_size=cfg.batch,
              loss_fn=F.cross_entropy, callbacks=[Evaluate({"test": test}, every=spe)],
              run=run, tag=f"band-{name}-s{seed}", seed=seed, log_every=spe, progress=False)
    after = activation_sparsity(model, test, output_tol=tol)
    return {"diverged": bool(res.diverged), "acc": float(res.last("test_acc", math.nan)),
            "band0": before.mean, "band1": after.mean,
            "zero0": before.mean_zero_output, "zero1": after.mean_zero_output}


def band_study(cfg: Any, run: Any, data: Any) -> tuple[list[dict], list[dict], dict]:
    """ReLU and the four sign combinations over ``cfg.band_seeds`` paired seeds.

    Returns:
        (per-run rows, verdict rows of :mod:`flatlab.report.stats`, results).
    """
    seeds = [cfg.seed + i for i in range(cfg.band_seeds)]
    rows, verdicts, res = [], [], {}
    for shifts in (None, *SIGNS):
        runs = [train_band(cfg, run, shifts, s, data) for s in seeds]
        name = "ReLU (reference)" if shifts is None else f"(s_x, s_y) = ({shifts[0]:+g}, " \
            f"{shifts[1]:+g})"
        for s, r in zip(seeds, runs):
            rows.append({"activation": name, "seed": s, "zero-derivative init":
                         round(r["band0"], 4), "zero-derivative final": round(r["band1"], 4),
                         "near-zero output init": round(r["zero0"], 4),
                         "near-zero output final": round(r["zero1"], 4),
                         "test acc": round(r["acc"], 4), "diverged": r["diverged"]})
        ok = [r for r in runs if not r["diverged"] and math.isfinite(r["band1"])]
        if len(ok) < 2:
            verdicts.append({"claim": f"{name}: zero-derivative fraction rises",
                             "verdict": f"not shown at this scale: {len(ok)} finite runs",
                             "passed": False})
            continue
        band = Gate(f"{name}: zero-derivative fraction rises", "greater").check(
            paired_difference([r["band1"] for r in ok], [r["band0"] for r in ok]))
        zero = Gate(f"{name}: near-zero-output fraction rises", "greater").check(
            paired_difference([r["zero1"] for r in ok], [r["zero0"] for r in ok]))
        for v in (band, zero):
            verdicts.append(v.as_row())
        key = "band.relu" if shifts is None else f"band.x{shifts[0]:+g}_y{shifts[1]:+g}"
        res[f"{key}.band_rises"] = band.passed
        res[f"{key}.zero_output_rises"] = zero.passed
        res[f"{key}.band_delta"] = band.interval.estimate
        res[f"{key}.zero_delta"] = zero.interval.estimate
    shifted = [k for k in res if k.endswith(".band_rises") and not k.startswith("band.relu")]
    res["band.all_four_rise"] = bool(shifted) and all(res[k] for k in shifted)
    return rows, verdicts, res
