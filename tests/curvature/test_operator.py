"""The operator protocol: dense wrapper, duck-typed operators, validation."""

from __future__ import annotations

import pytest
import torch

from flatlab.curvature import (
    DenseOperator,
    as_operator,
    hessian_trace,
    spectral_density,
    top_eigenvalues,
)

from .conftest import spectrum_matrix


class MatvecOnly:
    """The minimal protocol: shape, dtype, device, matvec (no matmat, no counter)."""

    def __init__(self, A):
        self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device
        self.calls = 0

    def matvec(self, v):
        self.calls += 1
        return self.A @ v


def test_duck_typed_operator_works_everywhere():
    lam = torch.linspace(-1, 4, 40, dtype=torch.float64)
    A = spectrum_matrix(lam, seed=4)
    op = MatvecOnly(A)
    assert as_operator(op) is op
    res = top_eigenvalues(op, k=2, tol=1e-10)
    torch.testing.assert_close(res.values, lam.flip(0)[:2], rtol=1e-9, atol=0)
    assert res.n_matvecs == op.calls
    before = op.calls
    tr = hessian_trace(op, probes=9, method="hutchinson")
    assert op.calls - before == 9 and tr.n_matvecs == 9
    d = spectral_density(op, steps=40)  # steps = n: exact quadrature for this probe
    assert abs(d.moment(1) * 40 - float(lam.sum())) < 0.25 * abs(float(lam.sum()))


def test_dense_operator_counts_and_validates():
    A = torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))
    op = DenseOperator(A)
    op @ torch.ones(4, dtype=torch.float64)
    op @ torch.ones(4, 3, dtype=torch.float64)
    assert op.n_matvecs == 4
    torch.testing.assert_close(op.to_dense(), A)
    with pytest.raises(ValueError, match="matrix must be square"):
        DenseOperator(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="vector must have shape"):
        op.matvec(torch.ones(4, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="op must be"):
        as_operator("not an operator")
