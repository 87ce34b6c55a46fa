"""The GAM paper's claims as paired differences over seeds, judged by :mod:`flatlab.report.stats`.

Each claim compares optimizer ``a`` with optimizer ``b`` on one measure: the per-seed
differences ``a_s - b_s`` (seed ``s``: same initialization and data order for both) get a 95%
t interval, and a :class:`~flatlab.report.stats.Gate` decides "reproduced" (the interval lies
on the claimed side of 0) or "not shown at this scale". Accuracies are in percentage points.
Claims whose optimizers were not run are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flatlab.report.stats import Gate, Verdict, paired_difference
from flatlab.report.summary import group_measurements

#: (a, b, measure key, gate) in the order of the results page
CLAIMS: list[tuple[str, str, str, Gate]] = [
    ("gam", "sgd", "lambda_max", Gate("GAM(SGD) lowers λ_max vs SGD", "less")),
    ("gam", "sgd", "trace", Gate("GAM(SGD) lowers tr H vs SGD", "less")),
    ("gam", "sgd", "test_acc", Gate("GAM(SGD) raises test accuracy vs SGD", "greater",
                                    unit=" points")),
    ("gam_adamw", "adamw", "lambda_max", Gate("GAM(AdamW) lowers λ_max vs AdamW", "less")),
    ("gam_adamw", "adamw", "trace", Gate("GAM(AdamW) lowers tr H vs AdamW", "less")),
    ("gam_adamw", "adamw", "test_acc", Gate("GAM(AdamW) raises test accuracy vs AdamW",
                                            "greater", unit=" points")),
    ("samgam", "sam", "lambda_max", Gate("SAM+GAM lowers λ_max vs SAM (same radius)", "less")),
    ("samgam", "sam", "trace", Gate("SAM+GAM lowers tr H vs SAM (same radius)", "less")),
    ("samgam", "sam", "test_acc", Gate("SAM+GAM raises test accuracy vs SAM (same radius)",
                                       "greater", unit=" points")),
    ("gam", "sam_fd", "lambda_max", Gate("GAM(SGD) lowers λ_max vs SAM at rho'", "less")),
    ("gam", "sam_fd", "test_acc", Gate("GAM(SGD) raises test accuracy vs SAM at rho'",
                                       "greater", unit=" points")),
    ("gam", "sgd@gam", "test_acc", Gate("GAM(SGD) raises test accuracy vs SGD at equal CPU "
                                        "time", "greater", unit=" points")),
]

_SCALE = {"test_acc": 100.0}  # fractions -> percentage points


def _by_seed(recs: Iterable[Mapping[str, Any]], key: str) -> dict[str, float]:
    return {str(r["tag"]).rsplit("/", 1)[-1]: float(r[key]) * _SCALE.get(key, 1.0)
            for r in recs if key in r}


def claim_verdicts(records: Iterable[Mapping[str, Any]]) -> list[tuple[str, Verdict]]:
    """``(task, verdict)`` for every claim whose two optimizers were measured on >= 2 paired
    seeds, from ``measure/<task>/<optimizer>/seed<s>`` records (e.g. ``Run.metrics()``)."""
    groups = group_measurements(records)
    tasks = list(dict.fromkeys(names[0] for names in groups))
    out = []
    for task in tasks:
        for a, b, key, gate in CLAIMS:
            if (task, a) not in groups or (task, b) not in groups:
                continue
            va, vb = _by_seed(groups[task, a], key), _by_seed(groups[task, b], key)
            seeds = sorted(set(va) & set(vb), key=lambda s: int(s.removeprefix("seed")))
            if len(seeds) < 2:
                continue
            iv = paired_difference([va[s] for s in seeds], [vb[s] for s in seeds])
            out.append((task, gate.check(iv)))
    return out


def claim_rows(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The verdict table: one row per (task, claim) with the cell the verdict renders."""
    return [{"task": task, "claim": v.gate.claim, "paired difference (95% t CI)": v.cell(),
             "seeds": v.interval.n} for task, v in claim_verdicts(records)]
