r"""Paired comparisons over seeds: differences, 95% confidence intervals, and verdicts.

Every study in flatlab compares methods on *paired* seeds: run ``i`` of method A and run ``i``
of method B share the initialization and the data order, so the per-seed differences
``d_i = a_i - b_i`` cancel the seed-to-seed variation both methods share. A claim such as
"GAM lowers λ_max compared with SGD" is then a statement about the mean difference
``μ_d = E[d]``, and it is checked by a confidence interval for ``μ_d``.

**t interval** (the default). With ``n`` differences, mean ``d̄`` and sample standard
deviation ``s`` (divisor ``n - 1``)::

    d̄ ± t_{1-(1-level)/2, n-1} · s / sqrt(n)

exact when the differences are normal; with 5 seeds ``t_{0.975, 4} = 2.776``.

**Percentile bootstrap** (``method="bootstrap"``): ``n_boot`` resamples of the ``n``
differences with replacement (seeded, so the interval is reproducible), the mean of each, and
the ``(1-level)/2`` and ``1-(1-level)/2`` empirical quantiles of those means. It assumes no
normality but is too narrow for very few seeds (with 5 seeds it has at most 126 distinct
means); the t interval is the one to quote at 5 seeds.

**Verdicts.** A :class:`Gate` holds *one* claim: its direction (``"less"``: the difference is
claimed negative, ``"greater"``: positive) and a margin (``threshold``, 0 for a plain "lower" /
"higher" claim; e.g. ``-0.5`` with ``"greater"`` for "accuracy not worse by more than 0.5
points"). :meth:`Gate.check` turns an :class:`Interval` into a :class:`Verdict`; the verdict
alone renders both the table cell (:meth:`Verdict.cell`) and the sentence
(:meth:`Verdict.sentence`), so a threshold is written once, in code, and the prose cannot
disagree with the table. The claim is **reproduced** only when the whole interval lies on the
claimed side of the threshold (``high < threshold`` for ``"less"``, ``low > threshold`` for
``"greater"``); otherwise it is **not shown at this scale**, which says nothing about the
opposite claim.

Example:
    >>> sgd = [8.0, 7.6, 8.6, 7.9, 8.1]
    >>> gam = [4.1, 3.5, 4.4, 4.0, 4.3]
    >>> gate = Gate("GAM lowers λ_max vs SGD", direction="less")
    >>> v = gate.check(paired_difference(gam, sgd))
    >>> v.passed
    True
    >>> v.cell()
    'reproduced: -3.98 [-4.18, -3.78]'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "Gate", "Interval", "Verdict", "bootstrap_interval", "mean_interval", "paired_difference",
    "t_quantile",
]

Method = Literal["t", "bootstrap"]
Direction = Literal["less", "greater"]

REPRODUCED = "reproduced"
NOT_SHOWN = "not shown at this scale"


def _finite(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t distribution with ``df`` degrees of freedom.

    Example:
        >>> round(t_quantile(0.975, 4), 3)
        2.776
    """
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    from scipy.stats import t  # scipy comes with mnist1d, a hard dependency

    return float(t.ppf(q, df))


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval.

    Attributes:
        estimate: the mean (of the values, or of the paired differences).
        low, high: the interval's ends (``low <= estimate <= high`` for a t interval).
        level: the coverage, e.g. 0.95.
        method: ``"t"`` or ``"bootstrap"``.
        n: number of values (seeds) behind it.
    """

    estimate: float
    low: float
    high: float
    level: float
    method: Method
    n: int

    def excludes_zero(self) -> bool:
        """True when 0 lies outside ``[low, high]``."""
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 3) -> str:
        """``"-3.98 [-4.18, -3.78]"`` with ``digits`` significant digits on the widest part."""
        finite = [abs(v) for v in (self.estimate, self.low, self.high) if math.isfinite(v)]
        scale = max(finite, default=0.0) or 1.0  # all zero or none finite: as if of size 1
        decimals = max(0, digits - 1 - int(math.floor(math.log10(scale))))
        f = f"{{:.{decimals}f}}"
        return f"{f.format(self.estimate)} [{f.format(self.low)}, {f.format(self.high)}]"

    def __str__(self) -> str:
        return self.format()


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """t interval ``mean ± t_{(1+level)/2, n-1} s / sqrt(n)`` for the mean of ``values``.

    With one value the interval is infinite (nothing is known about the spread).

    Raises:
        ValueError: empty or non-finite ``values``, ``level`` outside (0, 1).
    """
    level = _check_level(level)
    x = _finite(values, "values")
    n = x.size
    if n == 0:
        raise ValueError("values must hold at least one number, got none")
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, -math.inf, math.inf, level, "t", 1)
    half = t_quantile(0.5 + level / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, level, "t", n)


def bootstrap_interval(values: Sequence[float], level: float = 0.95, n_boot: int = 10_000,
                       seed: int = 0) -> Interval:
    """Percentile-bootstrap interval for the mean of ``values`` (seeded, reproducible).

    Raises:
        ValueError: fewer than 2 values, non-finite values, bad ``level`` or ``n_boot``.
    """
    level = _check_level(level)
    x = _finite(values, "values")
    if x.size < 2:
        raise ValueError(f"bootstrap needs at least 2 values, got {x.size}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100, got {n_boot}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(float(x.mean()), float(lo), float(hi), level, "bootstrap", int(x.size))


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95,
                      method: Method = "t", n_boot: int = 10_000, seed: int = 0) -> Interval:
    """Interval for the mean paired difference ``mean(a_i - b_i)`` (``a_i``, ``b_i``: seed i).

    Args:
        a, b: one value per seed, in the same seed order (seed i of ``a`` pairs with seed i
            of ``b``: same initialization and data order).
        level: coverage (default 0.95).
        method: ``"t"`` (Student t, default) or ``"bootstrap"`` (percentile).
        n_boot, seed: bootstrap resamples and their seed (``method="bootstrap"`` only).

    Raises:
        ValueError: ``a`` and ``b`` of different lengths, non-finite values, unknown method.
    """
    xa, xb = _finite(a, "a"), _finite(b, "b")
    if xa.size != xb.size:
        raise ValueError(f"a and b must pair up seed by seed, got {xa.size} and {xb.size} values")
    d = xa - xb
    if method == "t":
        return mean_interval(d, level)
    if method == "bootstrap":
        return bootstrap_interval(d, level, n_boot, seed)
    raise ValueError(f"method must be 't' or 'bootstrap', got {method!r}")


@dataclass(frozen=True)
class Gate:
    """One claim about a paired difference ``a - b`` and the single threshold that decides it.

    Args:
        claim: the claim in words, e.g. ``"GAM(SGD) lowers λ_max vs SGD"``.
        direction: ``"less"`` (``a - b`` claimed below ``threshold``) or ``"greater"``.
        threshold: the margin (default 0); ``Gate("acc not worse", "greater", -0.5)`` is a
            non-inferiority claim: reproduced when the interval's low end exceeds -0.5.
        unit: appended to numbers in the sentence (e.g. ``" points"``).
    """

    claim: str
    direction: Direction = "less"
    threshold: float = 0.0
    unit: str = ""

    def __post_init__(self) -> None:
        if self.direction not in ("less", "greater"):
            raise ValueError(f"direction must be 'less' or 'greater', got {self.direction!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")

    def passes(self, interval: Interval) -> bool:
        """True when the whole interval lies on the claimed side of the threshold."""
        if self.direction == "less":
            return interval.high < self.threshold
        return interval.low > self.threshold

    def check(self, interval: Interval) -> Verdict:
        """The :class:`Verdict` of this claim on ``interval``."""
        return Verdict(self, interval)

    def rule(self) -> str:
        """The rule in words: ``"the 95% CI lies below 0"``."""
        side = "below" if self.direction == "less" else "above"
        return f"the CI lies entirely {side} {self.threshold:g}{self.unit}"


@dataclass(frozen=True)
class Verdict:
    """A :class:`Gate` applied to an :class:`Interval`; renders the table cell and the sentence.

    Attributes:
        gate: the claim and its threshold.
        interval: the measured paired difference.
    """

    gate: Gate
    interval: Interval

    @property
    def passed(self) -> bool:
        """True when the claim is reproduced."""
        return self.gate.passes(self.interval)

    @property
    def label(self) -> str:
        """``"reproduced"`` or ``"not shown at this scale"``."""
        return REPRODUCED if self.passed else NOT_SHOWN

    def cell(self, digits: int = 3) -> str:
        """Table cell: ``"reproduced: -3.98 [-4.18, -3.78]"``."""
        return f"{self.label}: {self.interval.format(digits)}"

    def sentence(self, digits: int = 3) -> str:
        """One sentence: the claim, the verdict, the interval and the rule that decided it."""
        iv = self.interval
        how = "t" if iv.method == "t" else "percentile bootstrap"
        pct = f"{100 * iv.level:g}%"
        return (f"{self.gate.claim}: {self.label} (paired difference {iv.format(digits)}"
                f"{self.gate.unit}, {pct} {how} CI over {iv.n} seeds; reproduced only when "
                f"{self.gate.rule()}).")

    def as_row(self, digits: int = 3) -> dict[str, str | float | bool]:
        """A results-table row: claim, verdict cell, and the raw numbers."""
        iv = self.interval
        return {"claim": self.gate.claim, "verdict": self.cell(digits), "passed": self.passed,
                "diff": iv.estimate, "low": iv.low, "high": iv.high, "n": iv.n}
