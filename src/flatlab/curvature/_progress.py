"""Budgets and the progress bar shared by every long measurement.

A :class:`Meter` counts the products (or loss evaluations) a measurement spends, against two
optional budgets, ``max_matvecs`` (a count) and ``max_seconds`` (wall-clock seconds since the
meter started). The instrument asks :meth:`Meter.allowed` how many more products it may start
(at most what it wants; ``0`` once a budget is spent or the next product would end past the
time budget at the rate measured so far), does them, then calls :meth:`Meter.update`. When a
budget ends, the instrument returns what it has with ``converged=False``.

On a terminal the meter draws one line on stderr, redrawn at most ten times a second::

    trace (xtrace) [##########..........] 30/60 products  12.3 s, ~12.1 s left

and erases nothing else. It is quiet when the stream is not a terminal (captured output,
a log file, a pipe) or when ``progress=False``. ``progress`` may also be a text stream, which
is used instead of stderr under the same terminal rule.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from flatlab._checks import check_positive, check_positive_int


def _stream(progress: Any) -> TextIO | None:
    if progress is False or progress is None:
        return None
    stream = sys.stderr if progress is True else progress
    isatty = getattr(stream, "isatty", None)
    try:
        return stream if callable(isatty) and isatty() else None
    except (ValueError, OSError):  # a closed stream
        return None


class Meter:
    """Product counter with budgets and a terminal progress bar (see module docstring).

    Args:
        label: what is measured, printed at the start of the line.
        total: products the measurement plans to spend (``None``: unknown, e.g. Lanczos
            until convergence); it sets the bar and the time-remaining estimate.
        max_matvecs: product budget, or ``None``.
        max_seconds: wall-clock budget in seconds, or ``None``.
        progress: ``True`` (stderr, if it is a terminal), ``False``, or a text stream.
        unit: the word for one product in the bar.
        ranks: in a data-parallel measurement (:mod:`flatlab._ranks`), the ranks that must
            stop together: the time budget's verdict is their minimum (one small all-reduce
            per check, only when ``max_seconds`` is set), and only rank 0 draws.
    """

    def __init__(self, label: str, total: int | None = None, *, max_matvecs: int | None = None,
                 max_seconds: float | None = None, progress: Any = True,
                 unit: str = "products", ranks: Any = None):
        self.label, self.unit = label, unit
        self.max_matvecs = None if max_matvecs is None else check_positive_int(
            "max_matvecs", max_matvecs)
        self.max_seconds = None if max_seconds is None else check_positive(
            "max_seconds", max_seconds, allow_inf=True)
        if total is not None and self.max_matvecs is not None:
            total = min(total, self.max_matvecs)
        self.total = total
        self.ranks = ranks
        self.stream = _stream(progress) if ranks is None or ranks.rank == 0 else None
        self.start = time.perf_counter()
        self.done = 0
        self.stopped = False  # a budget ended the measurement
        self._drawn = 0.0

    def elapsed(self) -> float:
        """Seconds since the meter started."""
        return time.perf_counter() - self.start

    def allowed(self, want: int = 1) -> int:
        """How many of ``want`` further products fit both budgets (0: stop now)."""
        n = int(want)
        if self.max_matvecs is not None:
            n = min(n, self.max_matvecs - self.done)
        if self.max_seconds is not None and n > 0:
            left = self.max_seconds - self.elapsed()
            if left <= 0:
                n = 0
            elif self.done > 0:
                per = self.elapsed() / self.done
                n = min(n, math.floor(left / per)) if per > 0 else n
            if self.ranks is not None:  # per-process clocks: stop on every rank together
                n = self.ranks.agree_min(max(n, 0))
        if n <= 0:
            self.stopped = True
            return 0
        return n

    @property
    def exhausted(self) -> bool:
        """True once no further product fits a budget."""
        return self.allowed(1) == 0

    def update(self, n: int = 1) -> None:
        """Count ``n`` products done and redraw the bar (throttled)."""
        self.done += int(n)
        if self.stream is not None and time.perf_counter() - self._drawn >= 0.1:
            self._draw()

    def _draw(self, end: str = "") -> None:
        self._drawn = time.perf_counter()
        t = self.elapsed()
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * round(20 * frac) + "." * (20 - round(20 * frac))
            count = f"[{bar}] {self.done}/{self.total} {self.unit}"
            left = t / self.done * (self.total - self.done) if self.done else float("nan")
        else:
            count = f"{self.done} {self.unit}"
            if self.max_matvecs is not None:
                count += f" (at most {self.max_matvecs})"
            left = float("nan")
        if self.max_seconds is not None:
            left = min(left, self.max_seconds - t) if left == left else self.max_seconds - t
        rest = f", ~{max(left, 0.0):.1f} s left" if left == left else ""
        self.stream.write(f"\r{self.label} {count}  {t:.1f} s{rest}\x1b[K{end}")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (terminal only)."""
        if self.stream is not None:
            self._draw(end="\n")

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
