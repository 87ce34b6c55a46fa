"""Synthetic problems with known structure: teacher-student data and quadratics.

**Teacher-student.** Inputs ``x ~ N(0, I_d)``; a fixed random *teacher* network
``t(x) = W_2 tanh(W_1 x / sqrt(d)) / sqrt(h)`` (``W_1``: ``(h, d)``, ``W_2``: ``(k, h)``, entries
N(0, 1)) produces targets. Regression: ``y = t(x) + noise * eps``, ``eps ~ N(0, I_k)``,
``y`` float32 ``(N, k)``. Classification: ``y = argmax_c (t(x)_c + noise * eps_c)`` (int64,
``k`` classes; ``noise`` flips labels near the teacher's decision boundaries). A *student*
trained on it has a known target function, which makes generalization and sharpness easy to
read.

**Quadratic.** ``L(theta) = 1/2 (theta - theta*)^T A (theta - theta*)`` with symmetric ``A``
(Hessian ``A`` everywhere). Gradient descent with step ``lr`` is stable iff
``lr < 2 / lambda_max(A)``: the classic edge-of-stability threshold (Cohen et al., arXiv
2103.00065). :class:`Quadratic` is an ``nn.Module`` whose single parameter is ``theta``; its
``forward`` ignores its input and returns the scalar loss, so ``flatlab.curvature`` sees it through
the usual contract with ``loss_fn = Quadratic.loss_fn`` and ``data = Quadratic.dummy_data()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from flatlab._checks import check_nonnegative, check_positive_int
from flatlab.data.splits import Splits, train_val_test_split

__all__ = [
    "Quadratic",
    "quadratic",
    "teacher_student_classification",
    "teacher_student_regression",
]


def _teacher_outputs(
    n: int, in_dim: int, out_dim: int, hidden: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_positive_int("n", n)
    check_positive_int("in_dim", in_dim)
    check_positive_int("out_dim", out_dim)
    check_positive_int("hidden", hidden)
    noise = check_nonnegative("noise", noise)
    g = torch.Generator().manual_seed(int(seed))
    w1 = torch.randn(hidden, in_dim, generator=g)  # (h, d)
    w2 = torch.randn(out_dim, hidden, generator=g)  # (k, h)
    x = torch.randn(n, in_dim, generator=g)  # (N, d)
    t = torch.tanh(x @ w1.T / math.sqrt(in_dim)) @ w2.T / math.sqrt(hidden)  # (N, k)
    return x, t + noise * torch.randn(n, out_dim, generator=g)


def teacher_student_regression(
    n: int = 1000,
    in_dim: int = 10,
    out_dim: int = 1,
    hidden: int = 16,
    noise: float = 0.1,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Splits:
    """Regression targets ``y = t(x) + noise * eps`` (float32 ``(N, k)``) from a tanh teacher."""
    x, y = _teacher_outputs(n, in_dim, out_dim, hidden, noise, seed)
    train, val, test = train_val_test_split(
        (x, y), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    return Splits(train, val, test, num_classes=None, input_shape=(in_dim,),
                  name="teacher_student_regression")


def teacher_student_classification(
    n: int = 1000,
    in_dim: int = 10,
    num_classes: int = 3,
    hidden: int = 16,
    noise: float = 0.0,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Splits:
    """Labels ``argmax(t(x) + noise * eps)`` from a random tanh teacher (int64 ``(N,)``)."""
    if isinstance(num_classes, int) and num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    x, logits = _teacher_outputs(n, in_dim, num_classes, hidden, noise, seed)
    train, val, test = train_val_test_split(
        (x, logits.argmax(1)), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    return Splits(train, val, test, num_classes=num_classes, input_shape=(in_dim,),
                  name="teacher_student_classification")


class Quadratic(nn.Module):
    """``L(theta) = 1/2 (theta - center)^T A (theta - center)`` as a module (parameter ``theta``).

    Args:
        A: symmetric ``(d, d)`` matrix (the Hessian).
        theta0: initial point ``(d,)`` (default all ones).
        center: minimiser ``(d,)`` (default zeros).

    Example:
        >>> q = Quadratic(torch.diag(torch.tensor([4.0, 1.0])), theta0=torch.tensor([1.0, 1.0]))
        >>> float(q().detach())
        2.5
    """

    def __init__(
        self,
        A: torch.Tensor,
        theta0: torch.Tensor | None = None,
        center: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(A, torch.Tensor) and A.dim() == 2 and A.shape[0] == A.shape[1]):
            raise ValueError(f"A must be a square matrix, got shape {getattr(A, 'shape', A)}")
        if not torch.allclose(A, A.T):
            raise ValueError("A must be symmetric, got a matrix with A != A^T")
        d = A.shape[0]
        center = torch.zeros(d, dtype=A.dtype) if center is None else center.to(A.dtype)
        theta0 = torch.ones(d, dtype=A.dtype) if theta0 is None else theta0.to(A.dtype)
        for name, v in (("center", center), ("theta0", theta0)):
            if v.shape != (d,):
                raise ValueError(f"{name} must have shape ({d},), got {tuple(v.shape)}")
        self.register_buffer("A", A.clone())
        self.register_buffer("center", center.clone())
        self.theta = nn.Parameter(theta0.clone())

    def forward(self, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """The loss (a scalar); ``inputs`` is accepted and ignored (measurement contract)."""
        r = self.theta - self.center  # (d,)
        return 0.5 * r @ (self.A @ r)  # ()

    @staticmethod
    def loss_fn(output: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """``loss_fn(model(inputs), targets)`` of the measurement contract: the output itself."""
        return output

    @staticmethod
    def dummy_data() -> tuple[torch.Tensor, torch.Tensor]:
        """A one-example ``(inputs, targets)`` pair for measurement functions."""
        return torch.zeros(1, 1), torch.zeros(1)

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``A``, largest first."""
        return torch.linalg.eigvalsh(self.A).flip(0)


def quadratic(
    eigenvalues: Sequence[float] | torch.Tensor,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    rotate: bool = True,
) -> Quadratic:
    """A :class:`Quadratic` with ``A = Q diag(eigenvalues) Q^T`` and ``theta0 ~ N(0, I)``.

    ``Q`` is a random orthogonal matrix (QR of a Gaussian matrix, seeded) if ``rotate``, else
    the identity. GD on it diverges iff ``lr > 2 / max(eigenvalues)``.
    """
    lam = torch.as_tensor(eigenvalues, dtype=dtype).flatten()
    if lam.numel() == 0:
        raise ValueError("eigenvalues must be non-empty, got an empty sequence")
    g = torch.Generator().manual_seed(int(seed))
    d = lam.numel()
    if rotate:
        q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
        q = q * torch.sign(torch.diagonal(r))  # unique Haar-distributed Q
    else:
        q = torch.eye(d, dtype=dtype)
    A = (q * lam) @ q.T
    A = 0.5 * (A + A.T)
    return Quadratic(A, theta0=torch.randn(d, generator=g, dtype=dtype))
