"""flatlab.report.stats against intervals computed by hand."""

from __future__ import annotations

import math

import pytest

from flatlab.report.stats import (
    NOT_SHOWN,
    REPRODUCED,
    Gate,
    Interval,
    bootstrap_interval,
    mean_interval,
    paired_difference,
    t_quantile,
)


def test_t_quantiles_match_tables() -> None:
    # Student t table, two-sided 95%: df 1, 2, 4, 9, 29
    for df, t in [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (29, 2.045)]:
        assert t_quantile(0.975, df) == pytest.approx(t, abs=5e-4)


def test_mean_interval_by_hand() -> None:
    # values 1, 2, 4: mean 7/3, s^2 = 7/3, se = sqrt(7/9) = 0.88192, t_{.975,2} = 4.30265
    iv = mean_interval([1.0, 2.0, 4.0])
    half = 4.302652729749464 * math.sqrt(7 / 9)
    assert iv.estimate == pytest.approx(7 / 3)
    assert (iv.low, iv.high) == pytest.approx((7 / 3 - half, 7 / 3 + half))
    assert (iv.low, iv.high) == pytest.approx((-1.4613, 6.1280), abs=1e-4)
    assert iv.n == 3 and iv.method == "t" and iv.level == 0.95


def test_paired_difference_by_hand() -> None:
    # d = a - b = 1, 2, 1, 2, 3: mean 1.8, s^2 = 2.8 / 4 = 0.7, se = sqrt(0.7 / 5) = 0.374166
    # t_{.975,4} = 2.776445 -> half width 1.038850
    a = [10.0, 12.0, 11.0, 13.0, 14.0]
    b = [9.0, 10.0, 10.0, 11.0, 11.0]
    iv = paired_difference(a, b)
    assert iv.estimate == pytest.approx(1.8)
    assert (iv.low, iv.high) == pytest.approx((0.761150, 2.838850), abs=1e-6)
    assert iv.excludes_zero()
    # 90% interval: t_{.95,4} = 2.131847
    iv90 = paired_difference(a, b, level=0.90)
    assert iv90.high - iv90.estimate == pytest.approx(2.131847 * math.sqrt(0.7 / 5), abs=1e-6)
    # pairing matters: the unpaired spread of a is much larger than that of a - b
    assert mean_interval(a).high - mean_interval(a).low > iv.high - iv.low


def test_single_seed_gives_an_infinite_interval_never_a_verdict() -> None:
    iv = paired_difference([1.0], [2.0])
    assert iv.estimate == -1.0 and math.isinf(iv.low) and math.isinf(iv.high)
    assert not Gate("lower", "less").check(iv).passed
    assert iv.format() == "-1.00 [-inf, inf]"


def test_bootstrap_by_hand() -> None:
    # two values 0 and 1: resampled means are 0, 0.5, 1 with probability 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% percentiles are 0 and 1
    iv = bootstrap_interval([0.0, 1.0], n_boot=20_000, seed=3)
    assert (iv.estimate, iv.low, iv.high, iv.method) == (0.5, 0.0, 1.0, "bootstrap")
    # constant differences: a degenerate interval at the constant
    iv = paired_difference([3.0, 4.0, 5.0], [1.0, 2.0, 3.0], method="bootstrap")
    assert (iv.low, iv.estimate, iv.high) == (2.0, 2.0, 2.0)
    # seeded: the same call gives the same interval
    vals = [0.3, -0.1, 0.8, 0.5, 0.2]
    assert bootstrap_interval(vals, seed=1) == bootstrap_interval(vals, seed=1)
    b = bootstrap_interval(vals)
    assert min(vals) <= b.low <= b.estimate <= b.high <= max(vals)


def test_gate_renders_cell_and_sentence_from_one_threshold() -> None:
    lower = Gate("GAM lowers λ_max vs SGD", direction="less")
    v = lower.check(paired_difference([4.1, 3.5, 4.4, 4.0, 4.3], [8.0, 7.6, 8.6, 7.9, 8.1]))
    assert v.passed and v.label == REPRODUCED
    assert v.cell().startswith("reproduced: -3.98 [")
    s = v.sentence()
    assert s.startswith("GAM lowers λ_max vs SGD: reproduced (paired difference -3.98 [")
    assert "95% t CI over 5 seeds" in s and "entirely below 0" in s
    # the same numbers against the opposite claim: not shown (never "refuted")
    higher = Gate("GAM raises λ_max", direction="greater")
    v2 = higher.check(v.interval)
    assert not v2.passed and v2.cell().startswith(NOT_SHOWN)


def test_gate_boundary_and_margin() -> None:
    touching = Interval(1.0, 0.0, 2.0, 0.95, "t", 5)  # touches 0: does not exclude it
    assert not Gate("up", "greater").check(touching).passed
    assert not touching.excludes_zero()
    # non-inferiority: "not worse by more than 0.5 points"
    ni = Gate("acc not worse", "greater", threshold=-0.5, unit=" points")
    assert ni.check(Interval(-0.1, -0.4, 0.2, 0.95, "t", 5)).passed
    v = ni.check(Interval(-0.1, -0.6, 0.4, 0.95, "t", 5))
    assert not v.passed and "above -0.5 points" in v.sentence()
    row = v.as_row()
    assert row["passed"] is False and row["claim"] == "acc not worse"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: paired_difference([1.0, 2.0], [1.0]), "pair up"),
        (lambda: paired_difference([1.0, float("nan")], [1.0, 2.0]), "finite"),
        (lambda: paired_difference([1.0, 2.0], [1.0, 2.0], method="z"), "method"),
        (lambda: mean_interval([]), "at least one"),
        (lambda: mean_interval([1.0, 2.0], level=1.0), "level"),
        (lambda: bootstrap_interval([1.0]), "at least 2"),
        (lambda: Gate("x", direction="down"), "direction"),
        (lambda: t_quantile(0.975, 0), "df"),
    ],
    ids=["unpaired", "nan", "method", "empty", "level", "boot-one", "direction", "df"],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_docstring_examples() -> None:
    import doctest

    import flatlab.report.stats as stats

    assert doctest.testmod(stats).failed == 0


@pytest.mark.parametrize(
    "interval, text",
    [
        (Interval(0.0, 0.0, 0.0, 0.95, "t", 5), "0.00 [0.00, 0.00]"),
        (Interval(0.0, -math.inf, math.inf, 0.95, "t", 1), "0.00 [-inf, inf]"),
        (Interval(-3.98, -4.18, -3.78, 0.95, "t", 5), "-3.98 [-4.18, -3.78]"),
        (Interval(0.001234, 0.0011, 0.0013, 0.95, "t", 5), "0.00123 [0.00110, 0.00130]"),
        (Interval(1234.5, 1200.0, 1270.0, 0.95, "t", 5), "1234 [1200, 1270]"),
    ],
)
def test_interval_format(interval, text):
    assert interval.format() == text
