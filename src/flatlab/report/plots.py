"""Figures of a run: curves, the top eigenvalue against the edge of stability, bars.

Every function takes plain Python data (metric records as written to ``metrics.jsonl``, or
dicts of numbers), draws with matplotlib's non-interactive Agg backend and returns the
``Figure`` (save it with ``Run.savefig``). Curves are keyed by a label (one line per optimizer
/ run); a record contributes a point when it holds the metric and it is finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["bars", "curves", "domain_bars", "eigenvalue_plot", "series"]

Records = Sequence[Mapping[str, Any]]


def series(records: Records, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the records holding a finite number under ``key`` (and ``x``)."""
    xs, ys = [], []
    for rec in records:
        v, s = rec.get(key), rec.get(x)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
            isinstance(s, (int, float))
        ):
            xs.append(float(s))
            ys.append(float(v))
    return xs, ys


def curves(
    histories: Mapping[str, Records],
    keys: str | Sequence[str],
    *,
    x: str = "step",
    logy: bool | None = None,
    title: str | None = None,
) -> plt.Figure:
    """One panel per metric in ``keys``, one line per label of ``histories``.

    ``logy=None`` uses a log scale for keys containing "loss" when all values are positive.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        drawn = False
        all_pos = True
        for label, records in histories.items():
            xs, ys = series(records, key, x)
            if xs:
                ax.plot(xs, ys, label=label, lw=1.4, marker="." if len(xs) < 30 else None)
                drawn = True
                all_pos = all_pos and min(ys) > 0
        use_log = ("loss" in key and all_pos) if logy is None else logy
        if drawn and use_log:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(key)
        ax.set_title(key if title is None else f"{title}: {key}")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center",
                    transform=ax.transAxes)
    fig.tight_layout()
    return fig


_EDGES = (
    ("edge_gd", "2/lr", "--"), ("edge_usam", "USAM edge", ":"), ("edge_sam", "SAM edge", "-."),
)


def eigenvalue_plot(histories: Mapping[str, Records], *, x: str = "step") -> plt.Figure:
    """``lambda_max`` per label against its edges of stability (2/lr, USAM, SAM; same colour)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for i, (label, records) in enumerate(histories.items()):
        color = colors[i % len(colors)]
        xs, ys = series(records, "lambda_max", x)
        if not xs:
            continue
        drawn = True
        ax.plot(xs, ys, color=color, lw=1.6, marker="o", ms=3, label=f"{label}: λ_max")
        for key, name, style in _EDGES:
            ex, ey = series(records, key, x)
            if ex:
                ax.plot(ex, ey, color=color, ls=style, lw=1.0, alpha=0.8, label=f"{label}: {name}")
    ax.set_xlabel(x)
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_title("Top eigenvalue vs edge of stability")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no eigenvalues logged", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def bars(values: Mapping[str, float], *, ylabel: str, title: str = "") -> plt.Figure:
    """One bar per label (e.g. sharpness per optimizer), each annotated with its value."""
    fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(values) + 1.5), 3.6))
    labels = list(values)
    heights = [float(values[k]) for k in labels]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rects = ax.bar(labels, heights, color=[colors[i % len(colors)] for i in range(len(labels))])
    for r, h in zip(rects, heights):
        ax.annotate(f"{h:.3g}", (r.get_x() + r.get_width() / 2, h), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title or ylabel)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def domain_bars(
    values: Mapping[str, Mapping[str, float]], *, ylabel: str = "accuracy", title: str = ""
) -> plt.Figure:
    """Grouped bars: one group per domain, one bar per label (``{label: {domain: value}}``)."""
    labels = list(values)
    domains: list[str] = []
    for per in values.values():
        domains.extend(d for d in per if d not in domains)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * len(domains) * max(len(labels), 1) * 0.5 + 2),
                                    3.8))
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [float(values[label].get(d, math.nan)) for d in domains], width, label=label)
    ax.set_xticks(range(len(domains)))
    ax.set_xticklabels(domains)
    ax.set_xlabel("domain")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} per domain")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
