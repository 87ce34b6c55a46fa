"""Per-domain plumbing shared by DGSAM and SAGM: one closure per training domain.

* :func:`check_closures`: the one validation of a sequence of per-domain closures;
* :func:`check_order`, :func:`random_order`: domain visiting orders;
* :func:`mean_domain_gradient`: one pass per domain at the current point, averaged;
* :class:`FreeContext`: the few :class:`flatlab.optim._step.StepContext` operations the
  per-domain sweeps use, over a plain list of tensors, for the functional kernels
  (``dgsam_gradient``, ``sagm_gradient``) used outside an optimizer (tests, analysis). Inside
  an optimizer the shell's context is used instead, so the shell alone owns the snapshot there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flatlab.optim import _tree
from flatlab.optim._step import ClosureError, NonFiniteStep

Closure = Callable[[], Any]


def check_closures(
    closures: Any, num_domains: int | None = None, *, owner: str = "the method"
) -> list[Closure]:
    """Return ``closures`` as a list, raising unless it is a non-empty sequence of callables
    (of length ``num_domains`` when that is given)."""
    if callable(closures):
        raise TypeError(
            f"{owner} needs a sequence of closures, one per training domain, got a single "
            "callable"
        )
    if closures is None or isinstance(closures, (str, bytes)) or not isinstance(
        closures, Sequence
    ):
        raise ValueError(
            f"{owner}.step needs a non-empty sequence of closures, one per training domain, "
            f"got {closures!r}"
        )
    closures = list(closures)
    if not closures:
        raise ValueError(
            f"{owner} needs a sequence of closures, one per training domain, got an empty list"
        )
    for i, c in enumerate(closures):
        if not callable(c):
            raise TypeError(f"closures[{i}] must be callable, got {c!r}")
    if num_domains is not None and len(closures) != num_domains:
        raise ValueError(
            f"len(closures) must equal num_domains={num_domains}, got {len(closures)}"
        )
    return closures


def check_order(order: Sequence[int], num_domains: int) -> list[int]:
    """Return ``order`` as a list, raising unless it is a permutation of ``range(num_domains)``."""
    order = [int(i) for i in order]
    if sorted(order) != list(range(num_domains)):
        raise ValueError(f"order must be a permutation of range({num_domains}), got {order}")
    return order


def random_order(num_domains: int, generator: torch.Generator | None = None) -> list[int]:
    """A uniformly random permutation of ``range(num_domains)`` drawn from ``generator``."""
    return torch.randperm(num_domains, generator=generator).tolist()


def mean_domain_gradient(
    ctx: Any, closures: Sequence[Closure], *, first: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One pass per domain at the current point: ``(1/S sum_d grad L_d, [L_d])``.

    ``first`` marks the unperturbed passes (the first one fixes ``ctx.params``)."""
    total: list[torch.Tensor] = []
    losses: list[torch.Tensor] = []
    for d, closure in enumerate(closures):
        losses.append(ctx.gradient(closure, first=first and d == 0))
        g = ctx.grads()
        if d == 0:
            total = [t.clone() for t in g]
        else:
            torch._foreach_add_(total, g)
    torch._foreach_mul_(total, 1.0 / len(closures))
    return total, losses


class FreeContext:
    """The sweep operations of a step context over plain tensors (module docstring)."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        self._saved: list[torch.Tensor] | None = None

    def gradient(self, closure: Closure, *, first: bool = False) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        with torch.enable_grad():
            loss = closure()
        if loss is None:
            raise ClosureError("the closure returned None; it must return the loss")
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        return loss.detach() if isinstance(loss, torch.Tensor) else torch.as_tensor(float(loss))

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params]

    def finite(self, loss: torch.Tensor | None, *values: torch.Tensor) -> list[float]:
        out = [float(v) for v in values]
        if not all(math.isfinite(v) for v in out + ([float(loss)] if loss is not None else [])):
            raise NonFiniteStep("non-finite loss or gradient")
        return out

    def perturb_(self, direction: Sequence[torch.Tensor], radius: float, scale: float) -> None:
        if self._saved is None:
            self._saved = _tree.snapshot(self.params)
        if radius != 0.0 and scale != 0.0:
            _tree.add_scaled_(self.params, list(direction), radius * scale)

    def restore(self, *, keep: bool = False) -> None:
        if self._saved is not None:
            _tree.restore_(self.params, self._saved)
            if not keep:
                self._saved = None
