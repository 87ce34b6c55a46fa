"""Argument validation shared by every flatlab module.

Messages follow one rule, ``"<name> must be <rule>, got <value>"``, so a user sees which
argument was wrong and what it held. These helpers raise; they never ``assert``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any


def check_real(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float; TypeError unless it is a real number (bools excluded),
    ValueError if it is NaN or (unless ``allow_inf``) infinite."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got {value}")
    if not allow_inf and math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_nonnegative(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float, raising unless it is a finite (or, with ``allow_inf``,
    possibly infinite) real number >= 0."""
    value = check_real(name, value, allow_inf=allow_inf)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_positive(name: str, value: Any, *, allow_inf: bool = False) -> float:
    """Return ``value`` as a float, raising unless it is a finite (or, with ``allow_inf``,
    possibly infinite) real number > 0."""
    value = check_real(name, value, allow_inf=allow_inf)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_in_range(name: str, value: Any, low: float, high: float, *, closed: str = "[)") -> float:
    """Return ``value`` as a float, raising unless it lies in the interval given by ``closed``."""
    value = check_real(name, value)
    lo_ok = value >= low if closed[0] == "[" else value > low
    hi_ok = value <= high if closed[1] == "]" else value < high
    if not (lo_ok and hi_ok):
        raise ValueError(f"{name} must be in {closed[0]}{low}, {high}{closed[1]}, got {value}")
    return value


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value``, raising unless it is an int >= 1 (bools excluded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return ``value``, raising unless it is one of ``choices`` (listed in the message)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
