"""Double-backward Hessian products through a gradient graph, built once or per product.

For one batch with mean loss ``L_b(w)``, double backward (Pearlmutter 1994) computes

    g_b = grad L_b(w)            (with create_graph=True: g_b is itself differentiable),
    H_b v = grad_w <g_b, v>      (one more backward pass through the graph of g_b).

The graph of ``g_b`` does not depend on ``v``. :class:`GradientGraphs` keeps it, one per
batch, so that every later product costs one backward pass instead of a forward and two
backward passes (what PyHessian does for one batch, here for a list of batches, weighted by
size as in :mod:`flatlab.curvature.hvp`). The memory it holds is measured while the graphs
are built, by summing the distinct storages autograd saves (``saved_tensors_hooks``); if the
sum passes the budget, the graphs are dropped and the caller streams instead.

:func:`double_backward_columns` is the streamed kernel for ``m`` columns: one graph per
batch, then ``m`` backward passes through it, so a product in a block costs less than a
single product.

Shapes: tangents are lists aligned with the selected parameters ``(*s_i,)``; a block of ``m``
columns is a list of ``(m, *s_i)`` tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def gradient_graph(floss, primals: Sequence[torch.Tensor], inputs, targets):
    """Leaves, differentiable gradient and the indices of parameters it depends on."""
    leaves = [p.detach().requires_grad_() for p in primals]
    with torch.enable_grad():
        loss = floss(leaves, inputs, targets)
        g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    used = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
    return leaves, g, used


def backward_through(leaves, g, used, tangents, like, retain: bool) -> list[torch.Tensor]:
    """``H_b t`` through a gradient graph; zeros for parameters the loss does not reach."""
    hv = [torch.zeros_like(p) for p in like]
    if not used:
        return hv
    with torch.enable_grad():
        out = torch.autograd.grad([g[i] for i in used], [leaves[i] for i in used],
                                  grad_outputs=[tangents[i] for i in used],
                                  retain_graph=retain, allow_unused=True)
    for i, o in zip(used, out):
        if o is not None:
            hv[i] = o.detach()
    return hv


def double_backward_columns(floss, primals, columns, inputs, targets) -> list[torch.Tensor]:
    """``H_b V`` for a block: one gradient graph, then one backward pass per column.

    ``columns`` is a list of ``(m, *s_i)`` tensors; returns the same layout.
    """
    leaves, g, used = gradient_graph(floss, primals, inputs, targets)
    m = columns[0].shape[0]
    outs = [backward_through(leaves, g, used, [c[j] for c in columns], primals, retain=j + 1 < m)
            for j in range(m)]
    return [torch.stack([o[i] for o in outs]) for i in range(len(primals))]


class _SavedBytes:
    """Sum of the distinct storages autograd saves while a graph is being built."""

    def __init__(self):
        self.seen: set[tuple[Any, int]] = set()
        self.total = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in self.seen:
            self.seen.add(key)
            self.total += storage.nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


class GradientGraphs:
    """The gradient graphs of every batch, kept for repeated products.

    Attributes:
        nbytes: memory held by the saved tensors (measured while building).
        fits: whether the build finished within ``budget`` bytes.
    """

    def __init__(self, floss, primals: Sequence[torch.Tensor], batch_list, budget: float):
        self.like = [p.detach() for p in primals]
        self.versions = [p._version for p in primals]
        self.graphs: list[tuple[int, list, tuple, list]] = []
        counter = _SavedBytes()
        self.fits = True
        for inputs, targets, n in batch_list:
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                leaves, g, used = gradient_graph(floss, primals, inputs, targets)
            self.graphs.append((n, leaves, g, used))
            if counter.total > budget:
                self.fits = False
                self.graphs = []  # free them now
                break
        self.nbytes = counter.total
        self.count = sum(gr[0] for gr in self.graphs)

    def stale(self, primals: Sequence[torch.Tensor]) -> bool:
        """True if a parameter was changed in place since the graphs were built."""
        return [p._version for p in primals] != self.versions

    def products(self, tangents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``sum_b n_b H_b t`` for one tangent (a list shaped like the parameters); divide by
        :attr:`count` (summed over the ranks first, in a data-parallel measurement)."""
        total = None
        for n, leaves, g, used in self.graphs:
            hv = backward_through(leaves, g, used, tangents, self.like, retain=True)
            if total is None:
                total = [h * n for h in hv]
            else:
                torch._foreach_add_(total, hv, alpha=n)
        return total
