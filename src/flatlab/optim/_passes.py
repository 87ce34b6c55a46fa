"""Context managers and collectives for one pass of a sharpness-aware step (used by base.py).

* :func:`frozen_norm_statistics`: BatchNorm/InstanceNorm running statistics (and
  ``num_batches_tracked``) are put back after a perturbed pass, so they change once per step.
* :func:`_backward_with_graph`: ``backward()`` inside the closure keeps the gradient's graph
  (``create_graph=True``) for Hessian-vector products, without changing the closure contract.
* :func:`_allreduce_mean`: average a list of tensors over ranks with one all-reduce.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["frozen_norm_statistics", "norm_modules"]


def norm_modules(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm/InstanceNorm modules of ``model`` that track running statistics."""
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
    ]


@contextlib.contextmanager
def frozen_norm_statistics(modules: Sequence[nn.Module] = ()) -> Iterator[None]:
    """Inside this block, every BatchNorm/InstanceNorm module that runs in training mode keeps
    its running statistics (``running_mean``, ``running_var``, ``num_batches_tracked``): they
    are saved at the module's first call and copied back on exit. The forward still
    normalizes with the batch statistics, so gradients are those of the training-mode model.

    Implementation: the ``forward`` of every ``_NormBase`` subclass that defines one is wrapped
    for the duration of the block (a global module hook would do the same but puts every
    module call of the model on PyTorch's slow hook path: 3 ms a step on a 120-module MLP).
    A ``torch.compile``-d model does not call those Python forwards: for it, pass its norm
    modules as ``modules`` (the optimizers do this when given ``model=``); their statistics
    are saved on entry.
    """
    saved: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def save(module: nn.Module) -> None:
        if module.track_running_stats and id(module) not in saved:
            bufs = [module.running_mean, module.running_var, module.num_batches_tracked]
            saved[id(module)] = [(b, b.clone()) for b in bufs if b is not None]

    for module in modules:
        save(module)

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if module.training:
                save(module)
            return original(module, *args, **kwargs)

        return forward

    patched = [(cls, cls.__dict__["forward"]) for cls in _norm_classes()]
    for cls, original in patched:
        cls.forward = wrap(original)
    try:
        yield
    finally:
        for cls, original in patched:
            cls.forward = original
        with torch.no_grad():
            for pairs in saved.values():
                for buf, copy in pairs:
                    buf.copy_(copy)


_CLASSES: tuple[tuple[int, ...], list[type], list[type]] = ((), [], [])


def _norm_classes() -> list[type]:
    """Every subclass of ``_NormBase`` (BatchNorm*, SyncBatchNorm, InstanceNorm*, user
    subclasses) that defines its own ``forward``. Cached; the cache is rebuilt when any class
    of the tree gains a subclass (a new class defined by the user)."""
    global _CLASSES
    counts, tree, with_forward = _CLASSES
    if tree and tuple(len(c.__subclasses__()) for c in tree) == counts:
        return with_forward
    tree, stack = [], [nn.modules.batchnorm._NormBase]
    while stack:
        cls = stack.pop()
        if cls in tree:
            continue
        tree.append(cls)
        stack.extend(cls.__subclasses__())
    with_forward = [c for c in tree if "forward" in c.__dict__]
    _CLASSES = (tuple(len(c.__subclasses__()) for c in tree), tree, with_forward)
    return with_forward


def _allreduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` over all ranks with one all-reduce of a flat buffer."""
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for t, f in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(f)


@contextlib.contextmanager
def _backward_with_graph() -> Iterator[None]:
    """Scoped: every ``backward`` (``Tensor.backward`` calls ``torch.autograd.backward``) keeps
    the graph of the gradient (``create_graph=True``), so the closure contract stays the same
    for methods that need Hessian-vector products (exact GAM)."""
    original = torch.autograd.backward
    signature = inspect.signature(original)

    def backward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.arguments["create_graph"] = True
        return original(*bound.args, **bound.kwargs)

    torch.autograd.backward = backward
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")
            yield
    finally:
        torch.autograd.backward = original

