"""Mean ± standard error over seeds of per-model measurement records.

Experiments that measure several trained models log one record per model with a tag
``measure/<group...>/seed<s>`` (e.g. ``measure/mnist1d_mlp/sam/seed2``). :func:`summarize`
groups such records by the tag without its last component and reports, for every numeric key,
the mean and the standard error ``s / sqrt(n)`` (sample standard deviation ``s``; 0 for a
single seed). ``flatlab compare`` and the experiments' own reports use this one function, so a
table rebuilt from a run folder equals the one in the report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MEASURE_PREFIX = "measure/"


def mean_se(values: Iterable[Any]) -> tuple[float, float]:
    """Mean and standard error of the finite numbers in ``values`` (NaN, NaN if none)."""
    vals = [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not vals:
        return float("nan"), float("nan")
    mean = sum(vals) / len(vals)
    if len(vals) < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    return mean, math.sqrt(var / len(vals))


def group_measurements(
    records: Iterable[Mapping[str, Any]], prefix: str = MEASURE_PREFIX
) -> dict[tuple[str, ...], list[Mapping[str, Any]]]:
    """``{("mnist1d_mlp", "sam"): [record per seed, ...]}`` from ``measure/...`` records."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for rec in records:
        tag = str(rec.get("tag", ""))
        if tag.startswith(prefix):
            parts = tag[len(prefix):].split("/")
            groups.setdefault(tuple(parts[:-1]), []).append(rec)
    return groups


def summarize(
    records: Iterable[Mapping[str, Any]],
    columns: Mapping[str, str] | None = None,
    group_names: Sequence[str] = ("task", "optimizer"),
    prefix: str = MEASURE_PREFIX,
) -> list[dict[str, Any]]:
    """One row per group: the group's names, ``seeds``, and ``"mean ± se"`` per measure.

    Args:
        records: metrics records (e.g. ``Run.metrics()``); only ``measure/...`` tags count.
        columns: ``{record key: column title}`` in display order; default: every numeric key
            except ``step``.
        group_names: titles of the tag components that name a group.
        prefix: tag prefix of measurement records.
    """
    groups = group_measurements(records, prefix)
    rows = []
    for names, recs in groups.items():
        cols = columns
        if cols is None:
            keys = dict.fromkeys(k for r in recs for k, v in r.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                                 and k != "step")
            cols = {k: k for k in keys}
        row: dict[str, Any] = {}
        for i, name in enumerate(names):
            row[group_names[i] if i < len(group_names) else f"group{i}"] = name
        row["seeds"] = len(recs)
        for key, title in cols.items():
            mean, se = mean_se(r.get(key) for r in recs)
            row[title] = f"{mean:.4g} ± {se:.2g}" if math.isfinite(mean) else "n/a"
        rows.append(row)
    return rows
