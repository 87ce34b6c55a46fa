"""flatlab._checks: messages name the argument, the rule and the value."""

from __future__ import annotations

import pytest

from flatlab import _checks as C


@pytest.mark.parametrize(
    ("fn", "args", "error", "match"),
    [
        (C.check_nonnegative, ("rho", -0.5), ValueError, r"rho must be >= 0, got -0.5"),
        (C.check_nonnegative, ("rho", "a"), TypeError, r"rho must be a real number, got 'a'"),
        (C.check_real, ("lr", True), TypeError, r"lr must be a real number"),
        (C.check_real, ("lr", float("nan")), ValueError, r"lr must not be NaN"),
        (C.check_positive, ("lr", 0.0), ValueError, r"lr must be > 0, got 0.0"),
        (C.check_nonnegative, ("rho", float("inf")), ValueError, r"rho must be finite, got inf"),
        (C.check_positive, ("lr", float("-inf")), ValueError, r"lr must be finite, got -inf"),
        (C.check_in_range, ("beta", 1.0, 0.0, 1.0), ValueError, r"beta must be in \[0.0, 1.0\)"),
        (C.check_positive_int, ("k", 0), ValueError, r"k must be >= 1, got 0"),
        (C.check_positive_int, ("k", 2.0), TypeError, r"k must be an int"),
        (C.check_choice, ("which", "big", ("largest", "smallest")), ValueError, r"'largest'"),
    ],
)
def test_bad_values_raise_with_message(fn, args, error, match) -> None:
    with pytest.raises(error, match=match):
        fn(*args)


def test_good_values_pass_through() -> None:
    assert C.check_nonnegative("rho", 0) == 0.0
    assert C.check_positive("lr", 1) == 1.0
    assert C.check_in_range("beta", 0.9, 0.0, 1.0) == 0.9
    assert C.check_positive_int("k", 3) == 3
    assert C.check_positive("nu", float("inf"), allow_inf=True) == float("inf")
    assert C.check_choice("which", "largest", ("largest",)) == "largest"
