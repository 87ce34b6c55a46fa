"""Schedules for the radii of sharpness-aware optimizers (rho, GAM's rho', ...).

A schedule is a pure function of the step index ``t`` (0-based, the optimizer's ``steps``
counter, which lives in its ``state_dict``) and the current learning rate ``lr`` of the first
param group. Because it reads the learning rate the optimizer *currently* has, any torch LR
scheduler attached to the wrapper composes with it: :class:`ProportionalToLR` follows
whatever the LR scheduler does. The wrapper evaluates the schedule at the start of every
``step``; being stateless, a schedule resumes exactly from the optimizer's step counter.

=====================  =====================================================================
schedule               value at step t
=====================  =====================================================================
``Constant(v)``        ``v``
``LinearWarmup``       ``start + (v - start) * min(t / warmup_steps, 1)``
``CosineWarmup``       ``start + (v - start) * (1 - cos(pi * min(t / warmup_steps, 1))) / 2``
``ProportionalToLR``   ``min_v + (max_v - min_v) * (lr - min_lr) / (max_lr - min_lr)``
=====================  =====================================================================

``ProportionalToLR`` is the idea of GSAM's ``ProportionScheduler`` (Zhuang et al. 2022,
arXiv 2203.08065): with a decaying LR, rho decays in proportion.

Example:
    >>> s = LinearWarmup(0.1, warmup_steps=10)
    >>> [round(s(t, lr=0.1), 3) for t in (0, 5, 10, 50)]
    [0.0, 0.05, 0.1, 0.1]
"""

from __future__ import annotations

import math
from typing import Any

from flatlab._checks import check_nonnegative, check_positive_int, check_real

__all__ = [
    "Constant", "CosineWarmup", "LinearWarmup", "ProportionalToLR", "Schedule", "as_schedule",
]


class Schedule:
    """Base class: ``schedule(t, lr) -> value`` (a float >= 0)."""

    def __call__(self, t: int, lr: float) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(Schedule):
    """Always ``value``."""

    def __init__(self, value: float) -> None:
        self.value = check_nonnegative("value", value)

    def __call__(self, t: int, lr: float) -> float:
        return self.value


class LinearWarmup(Schedule):
    """Linear ramp from ``start`` to ``value`` over ``warmup_steps`` steps, then ``value``."""

    def __init__(self, value: float, warmup_steps: int, start: float = 0.0) -> None:
        self.value = check_nonnegative("value", value)
        self.warmup_steps = check_positive_int("warmup_steps", warmup_steps)
        self.start = check_nonnegative("start", start)

    def __call__(self, t: int, lr: float) -> float:
        frac = min(t / self.warmup_steps, 1.0)
        return self.start + (self.value - self.start) * frac


class CosineWarmup(LinearWarmup):
    """Half-cosine ramp from ``start`` to ``value`` over ``warmup_steps`` steps, then ``value``."""

    def __call__(self, t: int, lr: float) -> float:
        frac = min(t / self.warmup_steps, 1.0)
        return self.start + (self.value - self.start) * 0.5 * (1.0 - math.cos(math.pi * frac))


class ProportionalToLR(Schedule):
    """Affine in the current learning rate: ``max_value`` at ``max_lr``, ``min_value`` at
    ``min_lr`` (GSAM's ``ProportionScheduler``). Clamped at 0 from below."""

    def __init__(
        self, max_value: float, max_lr: float, min_value: float = 0.0, min_lr: float = 0.0
    ) -> None:
        self.max_value = check_nonnegative("max_value", max_value)
        self.min_value = check_nonnegative("min_value", min_value)
        self.max_lr = check_real("max_lr", max_lr)
        self.min_lr = check_real("min_lr", min_lr)
        if not self.max_lr > self.min_lr:
            raise ValueError(f"max_lr must be > min_lr ({self.min_lr}), got {self.max_lr}")

    def __call__(self, t: int, lr: float) -> float:
        frac = (lr - self.min_lr) / (self.max_lr - self.min_lr)
        return max(self.min_value + (self.max_value - self.min_value) * frac, 0.0)


def as_schedule(name: str, value: Any) -> Schedule:
    """``value`` as a schedule: a Schedule is returned as is, a number >= 0 becomes Constant.

    Raises:
        TypeError: ``value`` is neither a real number nor a Schedule (e.g. the string "0.1").
        ValueError: ``value`` is negative or NaN.
    """
    if isinstance(value, Schedule):
        return value
    return Constant(check_nonnegative(name, value))
