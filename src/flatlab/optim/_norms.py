"""BatchNorm/InstanceNorm running statistics that change once per sharpness-aware step.

A sharpness-aware step runs the model several times (at theta and at perturbed points). Only
the unperturbed pass may update the running statistics (``running_mean``, ``running_var``,
``num_batches_tracked``) of the normalization layers; the others must leave them as they were.

Nothing here patches torch: the statistics of a known list of modules are copied into a
persistent buffer before a perturbed pass and copied back after it (:class:`NormStatistics`).
The list comes from ``model=`` when the user gives it, or else is *discovered* once, during the
first pass of the optimizer's first step, with a forward pre-hook registered through torch's
public API (``register_module_forward_pre_hook``) for that one pass only and filtered to the
stepping thread, so another thread's models are never touched. A ``torch.compile``-d module
(``OptimizedModule``) seen during discovery contributes the norm modules of its original
module, because compiled code does not call the Python forwards of its submodules.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["NormStatistics", "discover_norm_modules", "frozen_norm_statistics", "norm_modules"]

_NormBase = nn.modules.batchnorm._NormBase


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm/InstanceNorm modules of ``model`` that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


def _original(module: nn.Module) -> nn.Module | None:
    """The wrapped module of a ``torch.compile``-d module, else None."""
    orig = getattr(module, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) else None


def discover_norm_modules(run: Callable[[], Any]) -> tuple[Any, list[nn.Module], bool]:
    """Run ``run()`` and return ``(its result, the norm modules it called, compiled_seen)``.

    Only module calls made by the calling thread count. ``compiled_seen`` is True when a
    ``torch.compile``-d module ran (its original module's norm modules are included).
    """
    thread = threading.get_ident()
    found: dict[int, nn.Module] = {}
    compiled = [False]

    def hook(module: nn.Module, args: Any) -> None:
        if threading.get_ident() != thread:
            return
        orig = _original(module)
        if orig is not None:
            compiled[0] = True
            for m in norm_modules(orig):
                found.setdefault(id(m), m)
            handle.remove()  # compiled code must not trace this hook; its modules are known
        elif isinstance(module, _NormBase) and module.track_running_stats:
            found.setdefault(id(module), module)

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        result = run()
    finally:
        handle.remove()
    return result, list(found.values()), compiled[0]


class NormStatistics:
    """Save and restore the running statistics of a fixed list of norm modules.

    ``save()`` copies the buffers of the modules in training mode into persistent copies
    (allocated once, reused every step); ``restore()`` copies them back. Shapes: each module
    contributes ``running_mean`` and ``running_var`` (C,) and ``num_batches_tracked`` ().
    """

    def __init__(self, modules: Sequence[nn.Module] = ()) -> None:
        self.modules = list(modules)
        self._live: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self._key: tuple = ()

    def __bool__(self) -> bool:
        return bool(self.modules)

    def save(self) -> None:
        live = [
            b
            for m in self.modules if m.training
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None
        ]
        key = tuple((id(b), b.shape) for b in live)
        if key != self._key:
            self._copies = [b.detach().clone() for b in live]
            self._key = key
        elif live:
            torch._foreach_copy_(self._copies, live)
        self._live = live

    def restore(self) -> None:
        if self._live:
            with torch.no_grad():
                torch._foreach_copy_(self._live, self._copies)


@contextlib.contextmanager
def frozen_norm_statistics(modules: Sequence[nn.Module] | nn.Module) -> Iterator[None]:
    """Inside this block the running statistics of ``modules`` (or of every norm module of a
    model) are unchanged on exit: they are saved on entry and copied back. The forward still
    normalizes with batch statistics, so gradients are those of the training-mode model."""
    if isinstance(modules, nn.Module):
        modules = norm_modules(modules)
    stats = NormStatistics(modules)
    stats.save()
    try:
        yield
    finally:
        stats.restore()
