"""The ``dg`` report: DomainBed tables, per-domain figures, paired CIs, cost, target checks.

:func:`collect` (``flatlab collect RUNS_DIR``) rebuilds the tables, paired intervals and
figures from run folders alone; the tables themselves are :mod:`flatlab.report.dg_tables`.

Given the records of ``dg_records.jsonl`` (see :mod:`flatlab.report.dg_tables`) and a timing
benchmark, :func:`report` adds report sections to a run folder (tables, per-domain accuracy
and sharpness bars, ERM's validation curve, paired differences, cost,
:func:`~flatlab.report.dg_tables.target_checks`) and returns the headline numbers.

**Paired differences** (:func:`paired_rows`). Per seed (same initialization, in/out split and
data order for every method of a seed) and method, after model selection per test domain:

* ``acc``: mean over the test domains of the held-out domain's accuracy (%);
* ``worst``: the smallest of those per-test-domain accuracies (%);
* ``log_sharp_max``: the log of the largest per-training-domain worst-case sharpness,
  measured at the **same training step for every method** (the last one, record key
  ``final``), averaged over the test domains (each test domain trains a different model);
  sharpness is positive and varies by factors, so its paired difference is a log ratio
  (``exp`` of the interval is an interval for the ratio).

A pair uses the test domains both methods were run on and the seeds that cover them all.

For every method ``m`` and baseline ``b`` in (ERM, SAM) the per-seed differences ``m - b``
get a 95% t interval (:func:`flatlab.report.stats.paired_difference`) and a verdict
(:class:`flatlab.report.stats.Gate`): the claim "``m`` is more accurate / has a better worst
domain / is flatter than ``b``" is *reproduced* only when the interval excludes zero in that
direction.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flatlab.report.dg_tables import (
    METHOD_ORDER,
    RECORDS_FILE,
    SELECTIONS,
    MethodRow,
    aggregate,
    load_records,
    select,
    target_checks,
    to_latex,
    to_markdown,
)


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


#: metric -> (claim wording, claimed direction of ``m - b``, unit)
PAIRED_METRICS: dict[str, tuple[str, str, str]] = {
    "acc": ("more accurate on the held-out domains than", "greater", " points"),
    "worst": ("better on the worst held-out domain than", "greater", " points"),
    "log_sharp_max": ("flatter (log max per-domain sharpness, same step) than", "less", ""),
}


def _picks(
    records: Sequence[Mapping[str, Any]], selection: str,
) -> dict[tuple[str, str], dict[int, dict[str, dict[str, Any]]]]:
    """``{(dataset, method): {seed: {test domain: selected pick}}}``."""

    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["method"], r["test_domain"], r["seed"])].append(r)
    picked: dict[tuple[str, str], dict[int, dict[str, dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(dict))
    for (dataset, method, domain, seed), group in groups.items():
        picked[(dataset, method)][seed][domain] = select(list(group), selection)
    return picked


def _seed_metrics(by_domain: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    accs = [100 * p["acc"] for p in by_domain.values()]
    finals = [p["record"].get("final", {}).get("sharpness") for p in by_domain.values()]
    sharp = float(np.mean([f["max"] for f in finals])) if all(finals) else math.nan
    return {"acc": float(np.mean(accs)), "worst": float(min(accs)), "sharp_max": sharp,
            "log_sharp_max": math.log(sharp) if sharp > 0 else math.nan}


def per_seed_metrics(
    records: Sequence[Mapping[str, Any]], selection: str = SELECTIONS[0],
    domains: Sequence[str] | None = None,
) -> dict[tuple[str, str], dict[int, dict[str, float]]]:
    """``{(dataset, method): {seed: {"acc", "worst", "sharp_max", "log_sharp_max"}}}`` after
    model selection, over ``domains`` (default: every test domain the method was run on) and
    the seeds that cover all of them (module docstring)."""
    out: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for key, by_seed in _picks(records, selection).items():
        want = set(domains) if domains is not None else set.union(
            *(set(d) for d in by_seed.values()))
        out[key] = {seed: _seed_metrics({d: by_domain[d] for d in sorted(want)})
                    for seed, by_domain in sorted(by_seed.items()) if want <= set(by_domain)}
    return out


def paired_rows(
    records: Sequence[Mapping[str, Any]], selection: str = SELECTIONS[0],
    baselines: Sequence[str] = ("erm", "sam"), level: float = 0.95,
) -> list[dict[str, Any]]:
    """One row per (dataset, method, baseline, metric): the paired difference over seeds, on
    the test domains both methods were run on, its 95% t interval and the verdict (module
    docstring). ERM is a baseline only; needs >= 2 common seeds."""
    from flatlab.report.stats import Gate, paired_difference

    picked = _picks(records, selection)
    tested = {k: set.union(*(set(d) for d in v.values())) for k, v in picked.items()}
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    rows = []
    for dataset, method in sorted(tested, key=lambda k: (k[0], rank.get(k[1], 99), k[1])):
        for base in baselines:
            if method in ("erm", base) or (dataset, base) not in tested:
                continue
            common = sorted(tested[(dataset, method)] & tested[(dataset, base)])
            if not common:
                continue
            metrics = per_seed_metrics(records, selection, common)
            mine, other = metrics[(dataset, method)], metrics[(dataset, base)]
            seeds = sorted(set(mine) & set(other))
            for metric, (words, direction, unit) in PAIRED_METRICS.items():
                a = [mine[s][metric] for s in seeds]
                b = [other[s][metric] for s in seeds]
                if len(seeds) < 2 or not all(math.isfinite(v) for v in a + b):
                    continue
                gate = Gate(f"{method} {words} {base}", direction=direction, unit=unit)
                verdict = gate.check(paired_difference(a, b, level=level))
                raw = "sharp_max" if metric == "log_sharp_max" else metric
                rows.append({"dataset": dataset, "method": method, "baseline": base,
                             "metric": metric, "test_domains": common,
                             "mean_m": float(np.mean([mine[s][raw] for s in seeds])),
                             "mean_b": float(np.mean([other[s][raw] for s in seeds])),
                             **verdict.as_row(), "sentence": verdict.sentence()})
    return rows


def paired_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The paired rows as a Markdown table (one line each; for ``log_sharp_max`` the means
    are of the sharpness itself and ``exp(difference)`` is the ratio)."""
    head = ("| method | vs | metric | method mean | baseline mean | difference [95% CI] | "
            "n seeds |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['baseline']} | {r['metric']} | {r['mean_m']:.4g} | "
                     f"{r['mean_b']:.4g} | {r['verdict']} | {r['n']} |")
    return "\n".join(lines) + "\n"


def validation_curves(
    records: Sequence[Mapping[str, Any]], method: str = "erm",
) -> dict[str, list[dict[str, float]]]:
    """``{"test <domain>, seed <s>": checkpoints}`` of ``method`` (its ``val`` is the
    training-domain validation accuracy, ``test_in`` the held-out domain's), for the curve
    that shows where training-domain validation accuracy plateaus."""
    out: dict[str, list[dict[str, float]]] = {}
    mine = [r for r in records if r["method"] == method]
    varying = [k for k in ("lr", "rho", "batch_size")
               if len({r.get("hparams", {}).get(k) for r in mine}) > 1]
    for r in mine:
        tag = f"test {r['test_domain']}, seed {r['seed']}"
        for k in varying:  # hyperparameters that differ between the runs name them apart
            v = r.get("hparams", {}).get(k)
            tag += f", {k} {v:g}" if isinstance(v, (int, float)) else f", {k} {v}"
        out[tag] = [{"step": c["step"], "val": 100 * c["val"], "test_in": 100 * c["test_in"]}
                    for c in r["checkpoints"]]
    return dict(sorted(out.items()))


def figures(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``{"dg_accuracy": fig, "dg_sharpness": fig}``: grouped bars of the held-out domains'
    accuracy per method (training-domain validation) and of the selected models' sharpness
    per training domain and pooled."""
    from flatlab.report import plots

    rows = aggregate(records, SELECTIONS[0])
    curves = validation_curves(records)
    extra = {"dg_erm_validation": plots.curves(
        curves, ["val", "test_in"], title="ERM accuracy (%)")} if curves else {}
    return {
        **extra,
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
    saved = {name: run.savefig(fig, name) for name, fig in figures(records).items()}
    acc_fig, sharp_fig = saved["dg_accuracy"], saved["dg_sharpness"]
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
    if "dg_erm_validation" in saved:
        run.add_section(
            "ERM's training-domain validation curve",
            "Training-domain validation accuracy ('val', mean over the training domains' out "
            "splits) and the held-out domain's accuracy ('test_in') of every ERM run over "
            "training steps: the step count is credible only where 'val' has plateaued.",
            figures=[saved["dg_erm_validation"]])
    paired = paired_rows(records)
    if paired:
        run.add_section(
            "Paired differences against ERM and SAM",
            "Per seed, after training-domain-validation selection; 95% t intervals over seeds "
            "(flatlab.report.stats). A claim is reproduced only when its interval excludes 0 "
            "in the claimed direction. log_sharp_max (means: the sharpness itself) is measured "
            "at the same (last) step for every method.",
            table=[{k: r[k] for k in ("method", "baseline", "metric", "mean_m", "mean_b",
                                      "verdict", "n")} for r in paired])
    if timing:
        _cost_section(run, timing, cpu_timing, num_train_domains)
    checks = target_checks(rows, timing, num_train_domains, "wall-clock/step")
    checks += target_checks(rows, cpu_timing, num_train_domains, "CPU time/step")[6:]
    if checks:
        run.add_section("Targets of the issue", "Measured against the issue's targets.",
                        table=checks)
    run.write_text("results.md", to_markdown(rows + oracle))
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


def collect(runs_dir: str | Path, *, write: bool = True) -> tuple[str, str]:
    """Tables (Markdown, LaTeX) for both selection methods from the run folders under ``runs_dir``.

    With ``write=True`` they are also saved as ``runs_dir/results.md`` and ``results.tex``,
    with the figures ``dg_accuracy.png`` / ``dg_sharpness.png`` (linked from the Markdown).

    Raises:
        FileNotFoundError: ``runs_dir`` does not exist.
        ValueError: no finished ``dg`` run was found under it.
    """
    records = load_records(runs_dir)
    if not records:
        raise ValueError(f"no finished run with {RECORDS_FILE} found under {runs_dir}")
    rows = [row for sel in SELECTIONS for row in aggregate(records, sel)]
    md, tex = to_markdown(rows), to_latex(rows)
    for dataset in sorted({r.dataset for r in rows}):
        main = [r for r in rows if r.dataset == dataset and r.selection == SELECTIONS[0]]
        checks = target_checks(main, {r.method: r.sec_per_step for r in main},
                               main[0].num_domains - 1)
        if checks:
            md += (f"\n**{dataset}**, the issue's targets (training-domain validation; time: "
                   "mean s/step of the runs)\n\n| target | measured | required | met |\n"
                   "|---|---|---|---|\n" + "".join(
                       f"| {c['target']} | {c['measured']} | {c['required']} | "
                       f"{'yes' if c['met'] else 'NO'} |\n" for c in checks))
    for selection in SELECTIONS:
        paired = paired_rows(records, selection)
        if paired:
            md += (f"\n**Paired differences over seeds** ({selection} selection; 95% t "
                   "intervals, flatlab.report.stats; log_sharp_max at the same last step for "
                   "every method, means of the sharpness itself)\n\n" + paired_markdown(paired))
    if write:
        import matplotlib.pyplot as plt

        for name, fig in figures(records).items():
            fig.savefig(Path(runs_dir, f"{name}.png"), dpi=150, bbox_inches="tight")
            plt.close(fig)
            md += f"\n![{name}]({name}.png)\n"
        Path(runs_dir, "results.md").write_text(md)
        Path(runs_dir, "results.tex").write_text(tex)
    return md, tex
