"""Readability helpers of :mod:`flatlab.report.plots`: colours and styles per label, one legend
below the axes, clipping of diverged curves and the caption that names them.

A curve is *diverged* when its largest absolute value exceeds ``CLIP_FACTOR`` times the lower
median of the curves' largest values; it is drawn clipped at the edge of the axes (▲ above, ▼
below) so that it does not flatten the others, and :func:`caption` names it. The caption is
also set as ``fig.flatlab_caption``, which ``Run.savefig`` stores in the PNG (the training code
does not import this package).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

Label = str | tuple[str, str]

CLIP_FACTOR = 1e3
STYLES = (("-", None), ("--", None), (":", None), ("-.", None),
          ("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
GRAY = "#555555"
_CLIPPED: weakref.WeakKeyDictionary[plt.Figure, list[Clipped]] = weakref.WeakKeyDictionary()


def nonfinite(v: Any) -> bool:
    """A logged value that stands for a non-finite number (``metrics.jsonl`` writes "nan")."""
    if isinstance(v, str):
        return v.strip().lower() in {"nan", "inf", "-inf", "+inf", "infinity", "-infinity"}
    return isinstance(v, float) and not math.isfinite(v)


@dataclass(frozen=True)
class Clipped:
    """A curve (or bar) drawn clipped at the edge of the axes, or cut short by a non-finite value.

    Attributes:
        name: the run's label as the caption shows it.
        key: the metric (``"lambda_max"``, ``"loss"``, a bar chart's y label).
        peak: the largest absolute value logged (NaN if none was finite).
        peak_at: the ``x`` of that value (None for bars).
        nonfinite_at: the ``x`` of the first non-finite value (None if all were finite).
        x: the name of the x axis (``"step"``).
    """

    name: str
    key: str
    peak: float
    peak_at: float | None = None
    nonfinite_at: float | None = None
    x: str = "step"

    def describe(self) -> str:
        parts = []
        if math.isfinite(self.peak):
            where = f" at {self.x} {self.peak_at:g}" if self.peak_at is not None else ""
            parts.append(f"{self.key} reached {self.peak:.3g}{where}")
        if self.nonfinite_at is not None:
            parts.append(f"{self.key} non-finite from {self.x} {self.nonfinite_at:g}")
        return "; ".join(parts)


def clipped(fig: plt.Figure) -> list[Clipped]:
    """The diverged curves of a figure drawn by this module (empty when there are none)."""
    return list(_CLIPPED.get(fig, []))


def caption(fig: plt.Figure) -> str:
    """One sentence naming the diverged runs of ``fig`` ("" when every curve is on scale)."""
    items = clipped(fig)
    if not items:
        return ""
    by_name: dict[str, list[str]] = {}
    for c in items:
        by_name.setdefault(c.name, []).append(c.describe())
    runs = "; ".join(f"{name} ({', '.join(d)})" for name, d in by_name.items())
    return (f"Diverged: {runs}. Values more than {CLIP_FACTOR:g}x the other curves' scale are "
            "drawn clipped at the edge of the axes (▲/▼); ✕ marks the last finite value.")


def remember(fig: plt.Figure, items: list[Clipped]) -> None:
    if items:
        _CLIPPED[fig] = items
        fig.flatlab_caption = caption(fig)  # read by Run.savefig (train must not import report)


def display_name(label: Label) -> str:
    return label if isinstance(label, str) else " · ".join(label)


@dataclass
class Palette:
    """Colour (and style) per label: by the label, or by each half of ``(colour, style)``."""

    labels: Sequence[Label]
    colors: dict[str, str] = field(default_factory=dict)
    styles: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        firsts = list(dict.fromkeys(lab if isinstance(lab, str) else lab[0] for lab in self.labels))
        cmap = plt.get_cmap("tab10" if len(firsts) <= 10 else "tab20")
        self.colors = {f: matplotlib.colors.to_hex(cmap(i % cmap.N)) for i, f in enumerate(firsts)}
        seconds = [lab[1] for lab in self.labels if not isinstance(lab, str)]
        self.styles = {s: i for i, s in enumerate(dict.fromkeys(seconds))}

    def color(self, label: Label) -> str:
        return self.colors[label if isinstance(label, str) else label[0]]

    def style(self, label: Label) -> int | None:
        """Index of the label's style group (None for a plain string label)."""
        return None if isinstance(label, str) else self.styles[label[1]]

    def entries(self, style_handle: Any) -> list[tuple[Any, str]]:
        """Legend entries: one per colour group, then one per style group."""
        out: list[tuple[Any, str]] = [(Line2D([], [], color=c, lw=2), f) for f, c in
                                      self.colors.items()]
        out += [(style_handle(i), s) for s, i in self.styles.items()]
        return out


@dataclass
class Line:
    name: str
    key: str
    xs: list[float]
    ys: list[float]
    nonfinite_at: float | None
    style: dict[str, Any]


def clip_limit(peaks: Sequence[float]) -> float | None:
    """The largest peak on scale, when some peak is more than CLIP_FACTOR above the rest.

    The scale is the lower median of the curves' peaks, so a diverged minority (never a
    majority) is clipped.
    """
    peaks = sorted(p for p in peaks if math.isfinite(p))
    if len(peaks) < 2:
        return None
    ref = peaks[(len(peaks) - 1) // 2]
    if ref <= 0 or peaks[-1] <= CLIP_FACTOR * ref:
        return None
    return max(p for p in peaks if p <= CLIP_FACTOR * ref)


def draw(ax: plt.Axes, lines: Sequence[Line], x: str) -> list[Clipped]:
    """Plot ``lines`` on ``ax``, clipping diverged ones; return what was clipped or cut."""
    limit = clip_limit([max(abs(y) for y in ln.ys) for ln in lines if ln.ys])
    out = []
    for ln in lines:
        if not ln.xs:
            continue
        peak_i = max(range(len(ln.ys)), key=lambda i: abs(ln.ys[i]))
        over = limit is not None and abs(ln.ys[peak_i]) > limit
        ys = [max(-limit, min(limit, y)) for y in ln.ys] if over else ln.ys
        ax.plot(ln.xs, ys, **ln.style)
        color = ln.style.get("color")
        if over:
            for sign, marker in ((1, "^"), (-1, "v")):
                pts = [(px, py) for px, py, y0 in zip(ln.xs, ys, ln.ys) if sign * y0 > limit]
                if pts:
                    ax.plot(*zip(*pts), ls="none", marker=marker, ms=7, color=color,
                            markeredgecolor="black", clip_on=False, zorder=5)
        if ln.nonfinite_at is not None:
            last = [i for i, px in enumerate(ln.xs) if px < ln.nonfinite_at]
            if last:
                ax.plot([ln.xs[last[-1]]], [ys[last[-1]]], ls="none", marker="X", ms=8,
                        color=color, markeredgecolor="black", zorder=5)
        if over or ln.nonfinite_at is not None:
            out.append(Clipped(ln.name, ln.key, abs(ln.ys[peak_i]) if over else math.nan,
                               ln.xs[peak_i] if over else None, ln.nonfinite_at, x))
    return out


def marker_entries(items: Sequence[Clipped]) -> list[tuple[Any, str]]:
    out = []
    if any(math.isfinite(c.peak) for c in items):
        out.append((Line2D([], [], ls="none", marker="^", ms=7, color="white",
                           markeredgecolor="black"), "clipped (diverged)"))
    if any(c.nonfinite_at is not None for c in items):
        out.append((Line2D([], [], ls="none", marker="X", ms=7, color="white",
                           markeredgecolor="black"), "last finite value"))
    return out


def legend(fig: plt.Figure, entries: Sequence[tuple[Any, str]]) -> None:
    """One legend for the figure, below the axes, in as many columns as its width allows.

    The figure grows by the legend's height, so the axes keep their size; the legend lists each
    colour group and each style group once (:class:`Palette`), not every pair.
    """
    if not entries:
        return
    width, height = fig.get_size_inches()
    lengths = sorted(len(label) for _, label in entries)
    typical = lengths[(3 * len(lengths)) // 4]  # a few long labels may widen the figure
    ncols = max(1, min(len(entries), int(width / (0.6 + 0.075 * typical))))
    rows = math.ceil(len(entries) / ncols)
    fig.set_size_inches(width, height + 0.2 * rows + 0.15)
    handles, labels = zip(*entries)
    fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8,
               frameon=False)


def log_axis(values: Sequence[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)
