"""Domain-generalization results tables from ``dg`` records alone (DomainBed protocol).

A finished ``dg`` run folder holds ``dg_records.jsonl``: one record per trained model, i.e.
per (dataset, method, hyperparameter draw, test domain, seed), with its checkpoints::

    {"dataset", "method", "hparams", "hparams_id", "seed", "test_domain", "domains",
     "checkpoints": [{"step", "val", "test_in", "test_out"}, ...],
     "selected": {"step", "val", "test_in", "sharpness": {"per_domain", "max", "pooled"}},
     "sec_per_step", "passes_per_step"}

``val`` is the mean accuracy over the *training* domains' 20% "out" splits, ``test_in`` /
``test_out`` the held-out domain's 80% / 20% splits, ``selected`` the checkpoint of largest
``val`` within the run (with the sharpness measured there).

Model selection, per (dataset, method, test domain, seed), over draws and checkpoints:

* ``"training-domain validation"``: the draw and checkpoint of largest ``val``; report its
  ``test_in``.
* ``"oracle"``: the draw whose *last* checkpoint has the largest ``test_out``; report that
  checkpoint's ``test_in`` (DomainBed's oracle never selects checkpoints on the test domain).

Aggregation, per (dataset, method), DomainBed style: per test domain the mean over seeds
+- standard error ``std(x) / sqrt(n)`` (ddof 0, as DomainBed); "Avg" the mean of the
per-domain means, +- the standard error over seeds of each seed's average (seeds that cover
every domain); "Worst" the smallest per-domain mean; "Spread" the standard deviation (ddof 0)
of the per-domain means. Sharpness: the largest per-training-domain sharpness and the pooled
sharpness of the selected models, averaged over test domains and seeds. Cost: seconds and
gradient passes (closure calls) per step, averaged over runs.

:func:`target_checks` evaluates the targets of the DGSAM issue on one dataset's rows:

* DGSAM's largest per-domain sharpness <= 0.9 x ERM's and <= SAM's;
* DGSAM's mean accuracy >= ERM - 0.5 and >= SAM - 0.5 points; worst-domain accuracy >= ERM's;
  spread across test domains <= ERM's;
* time per step DGSAM / ERM <= 1.3 and DGSAM / SAM <= 0.8 (:data:`COST_LIMITS`; the ideal
  pass ratios are (S+1)/S and (S+1)/(2S)).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RECORDS_FILE = "dg_records.jsonl"
SELECTIONS = ("training-domain validation", "oracle")
#: The issue's cost targets: DGSAM's time per step at most this multiple of the baseline's.
COST_LIMITS = {"erm": 1.3, "sam": 0.8}
#: Table and figure order of the methods (others follow alphabetically).
METHOD_ORDER = ("erm", "sam", "gam", "sagm", "dgsam")


def load_records(runs_dir: str | Path) -> list[dict[str, Any]]:
    """All records of every finished run folder (one with a ``done`` marker) under ``runs_dir``.

    Raises:
        FileNotFoundError: ``runs_dir`` does not exist.
    """
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs directory does not exist: {root}")
    records = []
    for path in sorted(root.rglob(RECORDS_FILE)):
        if not (path.parent / "done").exists():
            continue  # unfinished or crashed runs do not count
        with open(path) as fh:
            records.extend(json.loads(line) for line in fh if line.strip())
    return records


def select(records: Sequence[dict[str, Any]], selection: str) -> dict[str, Any]:
    """Pick one result from the records of one (dataset, method, test domain, seed) group.

    Returns ``{"acc", "sharpness" (or None), "record"}``.
    """
    if selection == SELECTIONS[0]:
        best = max(records, key=lambda r: r["selected"]["val"])
        return {"acc": best["selected"]["test_in"], "sharpness": best["selected"].get("sharpness"),
                "record": best}
    if selection == SELECTIONS[1]:
        best = max(records, key=lambda r: r["checkpoints"][-1]["test_out"])
        return {"acc": best["checkpoints"][-1]["test_in"], "sharpness": None, "record": best}
    choices = ", ".join(map(repr, SELECTIONS))
    raise ValueError(f"selection must be one of {choices}, got {selection!r}")


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """``(mean, std / sqrt(n))`` with ddof 0, as DomainBed reports; NaNs for no values."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std() / math.sqrt(x.size))


@dataclass(frozen=True)
class MethodRow:
    """One method's results on one dataset under one selection method (accuracies in %)."""

    dataset: str
    method: str
    selection: str
    domains: tuple[str, ...]
    per_domain: dict[str, tuple[float, float]]
    average: tuple[float, float]
    worst: float
    spread: float
    sharpness_max: float
    sharpness_pooled: float
    sec_per_step: float
    passes_per_step: float
    n_seeds: int
    num_domains: int = 0  # domains of the dataset (training domains + the test domain)


def aggregate(records: Sequence[dict[str, Any]], selection: str = SELECTIONS[0]) -> list[MethodRow]:
    """Select per (dataset, method, test domain, seed), then aggregate per (dataset, method)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"], r["method"], r["test_domain"], r["seed"])].append(r)
    picked: dict[tuple[str, str], dict[str, dict[Any, dict[str, Any]]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    for (dataset, method, domain, seed), group in groups.items():
        picked[(dataset, method)][domain][seed] = select(group, selection)
    rows = []
    def order(item: tuple[tuple[str, str], Any]) -> tuple[str, int, str]:
        (dataset, method), _ = item
        rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
        return dataset, rank, method

    for (dataset, method), by_domain in sorted(picked.items(), key=order):
        first = next(p["record"] for m in by_domain.values() for p in m.values())
        order = [d for d in first["domains"] if d in by_domain]
        per_domain = {d: mean_se(100 * p["acc"] for p in by_domain[d].values()) for d in order}
        seeds = set.intersection(*(set(by_domain[d]) for d in order))
        seed_avgs = [np.mean([100 * by_domain[d][s]["acc"] for d in order]) for s in sorted(seeds)]
        means = np.array([per_domain[d][0] for d in order])
        avg = (float(means.mean()), mean_se(seed_avgs)[1] if seed_avgs else math.nan)
        sharp = [p["sharpness"] for d in order for p in by_domain[d].values() if p["sharpness"]]
        runs = [p["record"] for d in order for p in by_domain[d].values()]
        rows.append(MethodRow(
            dataset=dataset, method=method, selection=selection, domains=tuple(order),
            per_domain=per_domain, average=avg, worst=float(means.min()),
            spread=float(means.std()),
            sharpness_max=float(np.mean([s["max"] for s in sharp])) if sharp else math.nan,
            sharpness_pooled=float(np.mean([s["pooled"] for s in sharp])) if sharp else math.nan,
            sec_per_step=float(np.mean([r["sec_per_step"] for r in runs])),
            passes_per_step=float(np.mean([r["passes_per_step"] for r in runs])),
            n_seeds=len(seeds), num_domains=len(first["domains"]),
        ))
    return rows


def target_checks(rows: Sequence[MethodRow], timing: Mapping[str, float],
                  num_train_domains: int, time_label: str = "time/step") -> list[dict[str, Any]]:
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
        for base, limit in COST_LIMITS.items():
            ratio = timing["dgsam"] / timing[base]
            out.append({"target": f"{time_label} DGSAM / {base.upper()}",
                        "measured": round(ratio, 3),
                        "required": f"<= {limit} (ideal passes: "
                                    f"{ideal if base == 'erm' else ideal / 2:.3f})",
                        "met": bool(ratio <= limit)})
    return out


def _fmt(pair: tuple[float, float], pm: str) -> str:
    mean, se = pair
    if math.isnan(mean):
        return "-"
    return f"{mean:.1f}" if math.isnan(se) else f"{mean:.1f} {pm} {se:.1f}"


def _num(x: float, digits: int = 4) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}g}"


def _table(rows: Sequence[MethodRow], pm: str) -> tuple[list[str], list[list[str]]]:
    domains = rows[0].domains
    head = ["Method", *domains, "Avg", "Worst", "Spread", "Sharp. max", "Sharp. pooled",
            "s/step", "passes/step"]
    body = [[r.method, *[_fmt(r.per_domain.get(d, (math.nan, math.nan)), pm) for d in domains],
             _fmt(r.average, pm), f"{r.worst:.1f}", f"{r.spread:.2f}", _num(r.sharpness_max),
             _num(r.sharpness_pooled), f"{1000 * r.sec_per_step:.1f} ms",
             f"{r.passes_per_step:g}"] for r in rows]
    return head, body


def _by_table(rows: Sequence[MethodRow]) -> dict[tuple[str, str], list[MethodRow]]:
    out: dict[tuple[str, str], list[MethodRow]] = defaultdict(list)
    for r in rows:
        out[(r.dataset, r.selection)].append(r)
    return out


def to_markdown(rows: Sequence[MethodRow]) -> str:
    """Markdown tables, one per (dataset, selection method); accuracies in % (mean +- s.e.)."""
    parts = []
    for (dataset, selection), group in _by_table(rows).items():
        head, body = _table(group, "±")
        n = max(r.n_seeds for r in group)
        parts.append(f"**{dataset}**, {selection} selection ({n} seeds)\n")
        parts.append("| " + " | ".join(head) + " |")
        parts.append("|" + "|".join("---" for _ in head) + "|")
        parts.extend("| " + " | ".join(row) + " |" for row in body)
        parts.append("")
    return "\n".join(parts)


def to_latex(rows: Sequence[MethodRow]) -> str:
    """LaTeX ``tabular`` blocks (booktabs), one per (dataset, selection method)."""
    parts = []
    for (dataset, selection), group in _by_table(rows).items():
        head, body = _table(group, r"$\pm$")
        esc = [h.replace("_", r"\_") for h in head]
        parts.append(f"% {dataset}, {selection} selection")
        parts.append(r"\begin{tabular}{l" + "c" * (len(head) - 1) + "}")
        parts.append(r"\toprule")
        parts.append(" & ".join(esc) + r" \\")
        parts.append(r"\midrule")
        for row in body:
            parts.append(" & ".join(c.replace("_", r"\_") for c in row) + r" \\")
        parts.append(r"\bottomrule")
        parts.append(r"\end{tabular}")
        parts.append("")
    return "\n".join(parts)
