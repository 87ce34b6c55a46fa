"""Figures of a run: curves, the top eigenvalue against the edge of stability, bars.

Every function takes plain Python data (metric records as written to ``metrics.jsonl``, or
dicts of numbers), draws with matplotlib's non-interactive Agg backend and returns the
``Figure`` (save it with ``Run.savefig``). A record contributes a point when it holds the
metric and it is finite.

Curves are keyed by a label: a string (one colour per label), or a pair ``(colour group,
style group)`` such as ``(phase, run)``, so that three optimizers in two runs are drawn as three
colours times two line styles with a legend of five entries, not six (``flatlab compare``).

Every figure keeps to three rules of readability:

* legends sit outside the axes, below them (``loc="outside lower center"``), never on the data;
* a curve whose largest value exceeds ``CLIP_FACTOR`` (1000) times the lower median of the
  curves' largest values (USAM's λ_max at 4.8e13 next to curves near 2) is *diverged*: it is
  drawn clipped at the edge of the axes and marked ▲ (▼ below zero), so it does not flatten the
  others; a curve that stops at a non-finite value is marked ✕ at its last finite point.
  :func:`caption` names these runs; ``Run.savefig`` stores the caption in the PNG (its
  ``Description`` text) and the report prints it under the figure;
* a ``loss`` panel uses a log axis only when its values are positive and span more than a
  decade (one decade on a log axis has unreadable tick labels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from flatlab.report._layout import (  # noqa: E402
    CLIP_FACTOR,
    GRAY,
    MARKERS,
    STYLES,
    Clipped,
    Label,
    Line,
    Palette,
    caption,
    clip_limit,
    clipped,
    display_name,
    draw,
    legend,
    log_axis,
    marker_entries,
    nonfinite,
    remember,
)

__all__ = ["CLIP_FACTOR", "Clipped", "Label", "bars", "caption", "clipped", "curves",
           "domain_bars", "eigenvalue_plot", "series"]

Records = Sequence[Mapping[str, Any]]
_EDGES = (
    ("edge_gd", "2/lr", "--"), ("edge_usam", "USAM edge", ":"), ("edge_sam", "SAM edge", "-."),
)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def series(records: Records, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """``(xs, ys)`` of the records holding a finite number under ``key`` (and ``x``)."""
    xs, ys = [], []
    for rec in records:
        v, s = rec.get(key), rec.get(x)
        if _number(v) and math.isfinite(v) and _number(s):
            xs.append(float(s))
            ys.append(float(v))
    return xs, ys


def _nonfinite_at(records: Records, key: str, x: str) -> float | None:
    """The ``x`` of the first record whose ``key`` is non-finite (None if there is none)."""
    for rec in records:
        if nonfinite(rec.get(key)) and _number(rec.get(x)):
            return float(rec[x])
    return None




# ---------------------------------------------------------------------------- figures
def curves(
    histories: Mapping[Label, Records],
    keys: str | Sequence[str],
    *,
    x: str = "step",
    logy: bool | None = None,
    title: str | None = None,
) -> plt.Figure:
    """One panel per metric in ``keys`` (two a row), one line per label of ``histories``.

    ``logy=None`` uses a log scale for keys containing "loss" when all drawn values are
    positive and span more than a decade. Pair labels ``(colour group, style group)`` share a
    colour per first element and a line style per second.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    cols = min(len(keys), 2)  # two panels a row: a report page shows them at a readable size
    rows = math.ceil(len(keys) / cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False,
                             layout="constrained")
    axes = grid.ravel()
    for ax in axes[len(keys):]:
        ax.remove()
    palette = Palette(list(histories))
    cut: list[Clipped] = []
    for ax, key in zip(axes, keys):
        lines = []
        for label, records in histories.items():
            xs, ys = series(records, key, x)
            style: dict[str, Any] = {"color": palette.color(label), "lw": 1.4,
                                     "label": display_name(label)}
            group = palette.style(label)
            if group is None:
                style["marker"] = "." if len(xs) < 30 else None
            else:
                style["ls"], style["marker"] = STYLES[group % len(STYLES)]
                style["ms"] = 3
            lines.append(Line(display_name(label), key, xs, ys, _nonfinite_at(records, key, x),
                              style))
        cut += draw(ax, lines, x)
        drawn = [y for line in ax.lines for y in line.get_ydata()]
        if drawn and (("loss" in key and log_axis(drawn)) if logy is None else logy):
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(key)
        ax.set_title(key if title is None else f"{title}: {key}")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, f"no '{key}' logged", ha="center", va="center",
                    transform=ax.transAxes)
    if any(series(r, k, x)[0] for r in histories.values() for k in keys):
        legend(fig, palette.entries(lambda i: Line2D([], [], color="black", lw=1.4,
                                                      ls=STYLES[i % len(STYLES)][0],
                                                      marker=STYLES[i % len(STYLES)][1]))
                + marker_entries(cut))
    remember(fig, cut)
    return fig


def _shared_edges(edges: Sequence[Line]) -> tuple[list[Line], list[Line]]:
    """Split edge lines into those of one run and constant ones several runs share (drawn once,
    grey, across the union of their steps)."""
    groups: dict[tuple[str, float], list[Line]] = {}
    for ln in edges:
        if ln.ys and max(ln.ys) - min(ln.ys) <= 1e-12 * max(1.0, abs(ln.ys[0])):
            groups.setdefault((ln.key, round(ln.ys[0], 12)), []).append(ln)
    own, shared = list(edges), []
    for (_, value), members in groups.items():
        if len(members) < 2:
            continue
        own = [ln for ln in own if all(ln is not m for m in members)]
        lo, hi = min(m.xs[0] for m in members), max(m.xs[-1] for m in members)
        style = {**members[0].style, "color": GRAY,
                 "label": f"{', '.join(m.name for m in members)}: {members[0].style['label']}"}
        shared.append(Line(", ".join(m.name for m in members), members[0].key, [lo, hi],
                            [value, value], None, style))
    return own, shared


def eigenvalue_plot(histories: Mapping[Label, Records], *, x: str = "step") -> plt.Figure:
    """``lambda_max`` per label against its edges of stability (2/lr, USAM, SAM).

    A label's edges share its colour and differ by line style; a constant edge that several
    labels share (the same 2/lr) is drawn once, in grey. With pair labels the colour follows
    the first element and the marker the second.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    palette = Palette(list(histories))
    lams, edges, present = [], [], []
    for label, records in histories.items():
        xs, ys = series(records, "lambda_max", x)
        if not xs:
            continue
        name, color = display_name(label), palette.color(label)
        group = palette.style(label)
        marker = "o" if group is None else MARKERS[group % len(MARKERS)]
        lams.append(Line(name, "lambda_max", xs, ys, _nonfinite_at(records, "lambda_max", x),
                          {"color": color, "lw": 1.6, "marker": marker, "ms": 3,
                           "label": f"{name}: λ_max"}))
        for key, qname, style in _EDGES:
            ex, ey = series(records, key, x)
            if ex:
                present.append(key)
                edges.append(Line(name, key, ex, ey, None, {
                    "color": color, "ls": style, "lw": 1.0, "alpha": 0.8,
                    "label": f"{name}: {qname}"}))
    ordered = []
    for lam in lams:  # each label's λ_max, then its own edges
        ordered += [lam] + [e for e in edges if e.name == lam.name]
    own, shared = _shared_edges(edges)
    ordered = [ln for ln in ordered if ln.key == "lambda_max" or any(ln is o for o in own)]
    cut = draw(ax, ordered + shared, x)
    ax.set_xlabel(x)
    ax.set_ylabel("top Hessian eigenvalue")
    ax.set_title("Top eigenvalue vs edge of stability")
    ax.grid(alpha=0.3)
    if lams:
        entries = palette.entries(lambda i: Line2D([], [], ls="none", color=GRAY,
                                                   marker=MARKERS[i % len(MARKERS)]))
        if len(palette.styles) == 0:  # plain labels: the colour entries carry λ_max's marker
            entries = [(Line2D([], [], color=h.get_color(), lw=1.6, marker="o", ms=3), t)
                       for h, t in entries]
        entries.append((Line2D([], [], color=GRAY, lw=1.6), "λ_max"))
        entries += [(Line2D([], [], color=GRAY, ls=style, lw=1.0), qname)
                    for key, qname, style in _EDGES if key in present]
        if shared:
            entries.append((Patch(color=GRAY), "grey: edge of several runs"))
        legend(fig, entries + marker_entries(cut))
    else:
        ax.text(0.5, 0.5, "no eigenvalues logged", ha="center", va="center", transform=ax.transAxes)
    remember(fig, cut)
    return fig


def _bar_labels(ax: plt.Axes, labels: Sequence[str]) -> None:
    """Tick labels that do not run into each other: rotated when they are long."""
    longest = max(map(len, labels), default=0)
    if longest > 9 or sum(map(len, labels)) > 6 * max(len(labels), 1):
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", rotation_mode="anchor")
    else:
        ax.set_xticks(range(len(labels)), labels)


def bars(values: Mapping[str, float], *, ylabel: str, title: str = "") -> plt.Figure:
    """One bar per label (e.g. sharpness per optimizer), each annotated with its value.

    A non-finite value is an empty slot marked "n/a"; a bar more than ``CLIP_FACTOR`` above the
    others' scale is clipped (hatched, ▲) and named by :func:`caption`.
    """
    labels = list(values)
    heights = [float(values[k]) for k in labels]
    fig, ax = plt.subplots(figsize=(max(3.5, 0.9 * len(values) + 1.5), 3.4), layout="constrained")
    limit = clip_limit([abs(h) for h in heights])
    colors = Palette(labels)
    shown = [h if not (limit and abs(h) > limit) else math.copysign(limit, h) for h in heights]
    rects = ax.bar(range(len(labels)), [h if math.isfinite(h) else 0.0 for h in shown],
                   color=[colors.color(k) for k in labels])
    cut = []
    for r, h, s, label in zip(rects, heights, shown, labels):
        text = f"{h:.3g}" if math.isfinite(h) else "n/a"
        if math.isfinite(h) and s != h:
            r.set_hatch("//")
            text += " ▲" if h > 0 else " ▼"
            cut.append(Clipped(label, ylabel, abs(h)))
        y = s if math.isfinite(s) else 0.0
        ax.annotate(text, (r.get_x() + r.get_width() / 2, y), ha="center",
                    va="bottom" if y >= 0 else "top", fontsize=8,
                    xytext=(0, 2 if y >= 0 else -2), textcoords="offset points")
    _bar_labels(ax, labels)
    ax.margins(y=0.12)
    ax.set_ylabel(ylabel)
    ax.set_title(title or ylabel)
    ax.grid(alpha=0.3, axis="y")
    remember(fig, cut)
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
    fig, ax = plt.subplots(figsize=(max(4.5, 0.5 * len(domains) * max(len(labels), 1) + 2), 3.6),
                           layout="constrained")
    palette = Palette(labels)
    for i, label in enumerate(labels):
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(domains))]
        ax.bar(xs, [float(values[label].get(d, math.nan)) for d in domains], width,
               label=label, color=palette.color(label))
    _bar_labels(ax, domains)
    ax.set_xlabel("domain")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{ylabel} per domain")
    ax.grid(alpha=0.3, axis="y")
    legend(fig, [(Patch(color=palette.color(k)), k) for k in labels])
    return fig
