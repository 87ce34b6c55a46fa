"""The ``dg`` report: DomainBed tables, per-domain figures, cost and the issue's target checks.

Given the records of ``dg_records.jsonl`` (see :mod:`flatlab.sweep.collect`) and a timing
benchmark, :func:`report` adds report sections to a run folder and returns the headline
numbers. :func:`target_checks` evaluates the targets of the DGSAM issue for one dataset:

* DGSAM's largest per-domain sharpness <= 0.9 x ERM's and <= SAM's;
* DGSAM's mean accuracy >= ERM - 0.5 and >= SAM - 0.5 points; worst-domain accuracy >= ERM's;
  spread across test domains <= ERM's;
* wall-clock per step DGSAM / ERM within 20% of (S+1)/S, and DGSAM / SAM <= 0.85.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flatlab.sweep.collect import SELECTIONS, MethodRow, aggregate, to_markdown


def _rows_table(rows: Sequence[MethodRow]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        row: dict[str, Any] = {"method": r.method}
        for d in r.domains:
            m, se = r.per_domain[d]
            row[d] = f"{m:.1f} ± {se:.1f}"
        row.update({"avg": f"{r.average[0]:.1f} ± {r.average[1]:.1f}", "worst": round(r.worst, 1),
                    "spread": round(r.spread, 2), "sharp_max": r.sharpness_max,
                    "sharp_pooled": r.sharpness_pooled, "passes/step": r.passes_per_step})
        out.append(row)
    return out


def per_domain_sharpness(
    records: Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, float]]:
    """``{method: {training domain: mean sharpness}}`` of the selected models (all splits)."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        for d, v in r["selected"]["sharpness"]["per_domain"].items():
            acc[r["method"]][d].append(v)
        acc[r["method"]]["pooled"].append(r["selected"]["sharpness"]["pooled"])
    return {m: {d: float(np.mean(v)) for d, v in per.items()} for m, per in acc.items()}


def target_checks(rows: Sequence[MethodRow], timing: Mapping[str, float],
                  num_train_domains: int) -> list[dict[str, Any]]:
    """The issue's targets as rows ``{target, measured, required, met}`` (needs erm/sam/dgsam)."""
    by = {r.method: r for r in rows}
    if not {"erm", "sam", "dgsam"} <= set(by):
        return []
    d, e, s = by["dgsam"], by["erm"], by["sam"]
    checks = [
        ("max sharpness DGSAM / ERM", d.sharpness_max / e.sharpness_max, "<= 0.9", 0.9, "le"),
        ("max sharpness DGSAM - SAM", d.sharpness_max - s.sharpness_max, "<= 0", 0.0, "le"),
        ("mean acc DGSAM - ERM (points)", d.average[0] - e.average[0], ">= -0.5", -0.5, "ge"),
        ("mean acc DGSAM - SAM (points)", d.average[0] - s.average[0], ">= -0.5", -0.5, "ge"),
        ("worst-domain acc DGSAM - ERM", d.worst - e.worst, ">= 0", 0.0, "ge"),
        ("spread DGSAM - ERM", d.spread - e.spread, "<= 0", 0.0, "le"),
    ]
    out = [{"target": t, "measured": round(v, 4), "required": req,
            "met": bool(v <= lim if op == "le" else v >= lim)} for t, v, req, lim, op in checks]
    if {"erm", "sam", "dgsam"} <= set(timing):
        ideal = (num_train_domains + 1) / num_train_domains
        ratio = timing["dgsam"] / timing["erm"]
        out.append({"target": "time/step DGSAM / ERM", "measured": round(ratio, 3),
                    "required": f"in [{0.8 * ideal:.3f}, {1.2 * ideal:.3f}] ((S+1)/S={ideal:.3f})",
                    "met": bool(0.8 * ideal <= ratio <= 1.2 * ideal)})
        ratio = timing["dgsam"] / timing["sam"]
        out.append({"target": "time/step DGSAM / SAM", "measured": round(ratio, 3),
                    "required": "<= 0.85", "met": bool(ratio <= 0.85)})
    return out


def report(run: Any, records: Sequence[Mapping[str, Any]], timing: Mapping[str, float],
           num_train_domains: int) -> dict[str, Any]:
    """Add the results sections and figures to ``run``; return the headline numbers."""
    from flatlab.report import plots

    rows = aggregate(records, SELECTIONS[0])
    oracle = aggregate(records, SELECTIONS[1])
    n_seeds = max(r.n_seeds for r in rows)
    acc_fig = run.savefig(plots.domain_bars(
        {r.method: {d: r.per_domain[d][0] for d in r.domains} for r in rows},
        ylabel="test accuracy (%)", title="held-out domain accuracy (training-domain val.)"),
        "dg_accuracy")
    sharp = per_domain_sharpness(records)
    sharp_fig = run.savefig(plots.domain_bars(
        sharp, ylabel="worst-case sharpness",
        title="sharpness of the selected model per training domain (and pooled)"),
        "dg_sharpness")
    run.add_section(
        "Domain generalization results",
        f"Leave-one-domain-out on {rows[0].dataset}, {n_seeds} seed(s); accuracy (%) of the "
        "held-out domain's 'in' split, mean ± standard error over seeds, model selected by "
        "training-domain validation. Worst = smallest per-domain mean, spread = standard "
        "deviation of the per-domain means; sharpness = largest per-training-domain and pooled "
        "worst-case sharpness of the selected model.",
        table=_rows_table(rows), figures=[acc_fig, sharp_fig])
    run.add_section("Oracle selection", "Same runs, test-domain (oracle) model selection.",
                    table=_rows_table(oracle))
    cost = [{"method": m, "median s/step": round(t, 5),
             "vs erm": round(t / timing["erm"], 3) if "erm" in timing else math.nan}
            for m, t in timing.items()]
    ideal = (num_train_domains + 1) / num_train_domains
    run.add_section(
        "Cost per step",
        f"Median wall-clock per optimizer step over interleaved rounds (S = {num_train_domains} "
        f"training domains, ideal DGSAM/ERM = (S+1)/S = {ideal:.3f}). Gradient passes per step "
        "(closure calls) are in the table above: DGSAM S+1 single-domain, SAM 2 pooled, ERM 1 "
        "pooled.", table=cost)
    checks = target_checks(rows, timing, num_train_domains)
    if checks:
        run.add_section("Targets of the issue", "Measured against the issue's targets.",
                        table=checks)
    (run.path / "results.md").write_text(to_markdown(rows + oracle))
    headline: dict[str, Any] = {}
    for r in rows:
        headline[f"{r.method}_avg_acc"] = round(r.average[0], 2)
        headline[f"{r.method}_worst_acc"] = round(r.worst, 2)
        headline[f"{r.method}_sharp_max"] = r.sharpness_max
    for m, t in timing.items():
        headline[f"{m}_sec_per_step"] = t
    headline["targets_met"] = f"{sum(c['met'] for c in checks)}/{len(checks)}" if checks else "-"
    return headline
