"""The ``dg`` report: DomainBed tables, per-domain figures, cost and the issue's target checks.

Given the records of ``dg_records.jsonl`` (see :mod:`flatlab.sweep.collect`) and a timing
benchmark, :func:`report` adds report sections to a run folder (tables, per-domain accuracy
and sharpness bars, cost, :func:`~flatlab.sweep.collect.target_checks`) and returns the
headline numbers.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flatlab.sweep.collect import SELECTIONS, MethodRow, aggregate, target_checks, to_markdown


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
    names = list(records[0]["domains"]) + ["pooled"] if records else []
    return {m: {d: float(np.mean(per[d])) for d in names if d in per} for m, per in acc.items()}


def figures(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"dg_accuracy": fig, "dg_sharpness": fig}``: grouped bars of the held-out domains'
    accuracy per method (training-domain validation) and of the selected models' sharpness
    per training domain and pooled."""
    from flatlab.report import plots

    rows = aggregate(records, SELECTIONS[0])
    return {
        "dg_accuracy": plots.domain_bars(
            {r.method: {d: r.per_domain[d][0] for d in r.domains} for r in rows},
            ylabel="test accuracy (%)", title="held-out domain accuracy (training-domain val.)"),
        "dg_sharpness": plots.domain_bars(
            per_domain_sharpness(records), ylabel="worst-case sharpness",
            title="sharpness of the selected model per training domain (and pooled)"),
    }


def _cost_section(run: Any, timing: Mapping[str, float], cpu: Mapping[str, float],
                  num_train_domains: int) -> None:
    def ratio(t: Mapping[str, float], m: str) -> float:
        return round(t[m] / t["erm"], 3) if "erm" in t and m in t else math.nan

    cost = [{"method": m, "wall s/step": round(t, 5), "wall vs erm": ratio(timing, m),
             "cpu s/step": round(cpu.get(m, math.nan), 5), "cpu vs erm": ratio(cpu, m)}
            for m, t in timing.items()]
    ideal = (num_train_domains + 1) / num_train_domains
    run.add_section(
        "Cost per step",
        f"Median wall-clock and CPU time (this process) per optimizer step over interleaved "
        f"rounds (S = {num_train_domains} training domains, ideal DGSAM/ERM = (S+1)/S = "
        f"{ideal:.3f}, DGSAM/SAM = (S+1)/(2S) = {ideal / 2:.3f}). Gradient passes per step "
        "(closure calls): DGSAM S+1 single-domain, SAM 2 pooled, ERM 1 pooled.", table=cost)


def report(run: Any, records: Sequence[Mapping[str, Any]], timing: Mapping[str, float],
           num_train_domains: int, cpu_timing: Mapping[str, float] | None = None,
           ) -> dict[str, Any]:
    """Add the results sections and figures to ``run``; return the headline numbers."""
    cpu_timing = dict(cpu_timing or {})
    if not records:  # timing benchmark only
        _cost_section(run, timing, cpu_timing, num_train_domains)
        return {**{f"{m}_sec_per_step": t for m, t in timing.items()},
                **{f"{m}_cpu_sec_per_step": t for m, t in cpu_timing.items()}}
    rows = aggregate(records, SELECTIONS[0])
    oracle = aggregate(records, SELECTIONS[1])
    n_seeds = max(r.n_seeds for r in rows)
    acc_fig, sharp_fig = (run.savefig(fig, name) for name, fig in figures(records).items())
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
    if timing:
        _cost_section(run, timing, cpu_timing, num_train_domains)
    checks = target_checks(rows, timing, num_train_domains, "wall-clock/step")
    checks += target_checks(rows, cpu_timing, num_train_domains, "CPU time/step")[6:]
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
    for m, t in cpu_timing.items():
        headline[f"{m}_cpu_sec_per_step"] = t
    headline["targets_met"] = f"{sum(c['met'] for c in checks)}/{len(checks)}" if checks else "-"
    return headline
