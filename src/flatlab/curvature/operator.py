"""The operator protocol every curvature estimator is written against.

A symmetric linear operator ``A`` of size ``n x n`` is anything with

* ``shape == (n, n)``, ``dtype``, ``device``;
* ``matvec(v)``: ``A v`` for a flat vector ``v`` of shape ``(n,)``;
* ``matmat(V)``: ``A V`` for ``V`` of shape ``(n, m)`` (column by column by default);
* ``n_matvecs``: how many products with a vector it has computed so far (a column of a
  ``matmat`` counts as one).

:class:`LinearOperator` is the base class; :class:`DenseOperator` wraps an explicit symmetric
matrix, so every estimator (eigenvalues, trace, density) also runs on a dense tensor, which
is how the tests check them against closed forms. :func:`flatlab.curvature.hvp.as_operator`
turns "a model plus loss and data", a dense tensor, or an operator into an operator (it lives
beside the model operators, so this module imports nothing of flatlab).
"""

from __future__ import annotations

import torch


class LinearOperator:
    """Base class: a symmetric ``n x n`` operator with a product counter.

    Subclasses implement ``_matvec`` (and may override ``_matmat`` for a batched product).
    """

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device):
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.n_matvecs = 0

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _check(self, x: torch.Tensor, ndim: int) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != ndim or x.shape[0] != self.shape[0]:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = "(n,)" if ndim == 1 else "(n, m)"
            raise ValueError(f"vector must have shape {want} with n={self.shape[0]}, got {got}")
        return x.to(device=self.device, dtype=self.dtype)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """Return ``A v`` for ``v`` of shape ``(n,)``."""
        v = self._check(v, 1)
        self.n_matvecs += 1
        return self._matvec(v)

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """Return ``A V`` for ``V`` of shape ``(n, m)``; counts ``m`` products."""
        V = self._check(V, 2)
        self.n_matvecs += V.shape[1]
        return self._matmat(V)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return self.matvec(x) if x.dim() == 1 else self.matmat(x)

    def to_dense(self) -> torch.Tensor:
        """The explicit ``n x n`` matrix (``n`` products; only for small ``n``)."""
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return self.matmat(eye)


class DenseOperator(LinearOperator):
    """A symmetric matrix ``A`` (shape ``(n, n)``) seen as an operator."""

    def __init__(self, matrix: torch.Tensor):
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            raise ValueError(f"matrix must be a 2-d tensor, got {getattr(matrix, 'shape', matrix)}")
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matrix @ v

    def _matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.matrix @ V
