r"""Loss functions evaluated on many points at once: ``x`` has shape ``(paths, d)``.

An objective gives the full (noise-free) loss ``f(x)`` per path, shape ``(paths,)``, and its
gradient ``grad f(x)``, shape ``(paths, d)``; the SDE models and the discrete-optimizer harness
add the gradient noise themselves. ``hvp(x, v)`` (Hessian-vector product, ``(paths, d)``) is
used by the order-2 SGD equation ``-grad(f + (eta/4)|grad f|^2) = -(grad f + (eta/2) H grad f)``.

* :class:`Quadratic` - ``f(x) = 0.5 (x - x*)^T H (x - x*)`` with ``H`` diagonal (eigenvalues,
  ``(d,)``) or full ``(d, d)``: the toy problem of the paper and of every closed form in
  :mod:`flatlab.sde.laws`.
* :class:`FunctionObjective` - any scalar function of one point, vectorised with
  ``torch.func.vmap`` (gradients and HVPs by ``torch.func``).
* :class:`NetworkObjective` - the full-batch loss of an ``nn.Module`` as a function of its
  flattened parameters, so ``paths`` independent copies of a small network train at once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flatlab._batches import Data, batches

__all__ = ["Objective", "Quadratic", "FunctionObjective", "NetworkObjective"]


class Objective:
    """Interface: ``dim``, ``loss(x) -> (paths,)``, ``grad(x) -> (paths, d)``, ``hvp``."""

    dim: int

    def check(self, x: torch.Tensor) -> None:
        """Raise ValueError unless ``x`` has shape ``(paths, dim)``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (paths, {self.dim}), got {tuple(x.shape)}")

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Hessian-vector product per path by forward-over-reverse differentiation."""
        return torch.func.jvp(self.grad, (x,), (v,))[1]


class Quadratic(Objective):
    r"""``f(x) = 0.5 (x - x*)^T H (x - x*)``.

    Args:
        hessian: eigenvalues ``(d,)`` (diagonal ``H``) or a symmetric matrix ``(d, d)``.
        minimum: ``x*``, shape ``(d,)``; zero by default.

    Example:
        >>> q = Quadratic(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> q.loss(torch.ones(3, 2, dtype=torch.float64)).tolist()
        [2.5, 2.5, 2.5]
    """

    def __init__(self, hessian: torch.Tensor, minimum: torch.Tensor | None = None) -> None:
        h = torch.as_tensor(hessian).detach()
        if h.dim() not in (1, 2) or (h.dim() == 2 and h.shape[0] != h.shape[1]):
            raise ValueError(f"hessian must have shape (d,) or (d, d), got {tuple(h.shape)}")
        if h.dim() == 2 and not torch.allclose(h, h.T):
            raise ValueError("hessian must be symmetric, got a non-symmetric matrix")
        self.hessian = h
        self._h_cache: tuple = (None, None)
        self.diagonal = h.dim() == 1
        self.dim = int(h.shape[0])
        if minimum is not None and tuple(minimum.shape) != (self.dim,):
            raise ValueError(f"minimum must have shape ({self.dim},), got {tuple(minimum.shape)}")
        self.minimum = minimum

    @property
    def eigenvalues(self) -> torch.Tensor:
        return self.hessian if self.diagonal else torch.linalg.eigvalsh(self.hessian)

    def _h(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.dtype, x.device)
        if self._h_cache[0] != key:  # converted once per dtype/device (hot loop)
            self._h_cache = (key, self.hessian.to(dtype=x.dtype, device=x.device))
        return self._h_cache[1]

    def _shift(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.minimum is None else x - self.minimum.to(dtype=x.dtype, device=x.device)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self.hvp(x, self._shift(x))

    def hvp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v * self._h(v) if self.diagonal else v @ self._h(v)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        y = self._shift(x)
        return 0.5 * (y * self.hvp(x, y)).sum(-1)


class FunctionObjective(Objective):
    """Any ``fn(point) -> scalar`` with ``point`` of shape ``(dim,)``, vectorised over paths."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], dim: int) -> None:
        self.fn = fn
        self.dim = int(dim)
        self._loss = torch.func.vmap(fn)
        self._grad = torch.func.vmap(torch.func.grad(fn))

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self._loss(x)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        self.check(x)
        return self._grad(x)


class NetworkObjective(FunctionObjective):
    """Full-batch loss of ``model`` as a function of its flattened parameters.

    ``loss_fn(model(inputs), targets)`` must be mean-reduced; over several batches the loss is
    the size-weighted mean (the full-data loss). Buffers are kept fixed (no BatchNorm updates).

    Args:
        model: the network; its current parameters give :meth:`initial_point`.
        loss_fn: e.g. ``torch.nn.functional.cross_entropy``.
        data: a tensor pair, a list of pairs or a DataLoader (read once and kept).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data: Data) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.buffers = dict(model.named_buffers())
        self.batches = list(batches(data))
        total = sum(n for _, _, n in self.batches)

        def fn(flat: torch.Tensor) -> torch.Tensor:
            params = {
                name: chunk.view(shape)
                for name, chunk, shape in zip(self.names, flat.split(self.sizes), self.shapes)
            }
            out = 0.0
            for inputs, targets, n in self.batches:
                pred = torch.func.functional_call(model, (params, self.buffers), (inputs,))
                out = out + loss_fn(pred, targets) * (n / total)
            return out

        super().__init__(fn, sum(self.sizes))

    def initial_point(self) -> torch.Tensor:
        """The model's current parameters, flattened: shape ``(dim,)``."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])
