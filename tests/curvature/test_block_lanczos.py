"""Block Lanczos resolves a repeated top eigenvalue without a restart (dense truth)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.curvature import hessian_operator, top_eigenvalues
from flatlab.curvature.block_lanczos import block_lanczos
from flatlab.curvature.operator import DenseOperator

from .conftest import problem, spectrum_matrix


def _repeated(n=200):
    # lambda_1 = 5 with multiplicity 3, then a gap, then a spread bulk
    lam = torch.cat([torch.full((3,), 5.0), torch.tensor([3.0]), torch.linspace(-1, 2, n - 4)])
    return spectrum_matrix(lam.double(), seed=7)


def test_block_finds_a_triple_top_eigenvalue_without_restart():
    A = _repeated()
    op = DenseOperator(A)
    res = top_eigenvalues(op, 4, block_size=3, krylov_dim=120, tol=1e-10)
    assert res.converged and res.method == "block_lanczos"
    assert torch.allclose(res.values, torch.tensor([5.0, 5.0, 5.0, 3.0], dtype=A.dtype),
                          atol=1e-8)
    assert res.n_matvecs == op.n_matvecs < 120  # the basis never filled: no restart
    # the vectors span the 3-dimensional eigenspace: A V = V diag(values)
    V = res.vectors
    assert torch.allclose(A @ V, V * res.values, atol=1e-6)
    assert torch.allclose(V.T @ V, torch.eye(4, dtype=A.dtype), atol=1e-8)


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_block_with_restarts_on_a_network_hessian(which):
    model, data, H = problem("tanh")
    truth = torch.linalg.eigvalsh(H)
    want = truth.flip(0)[:3] if which == "largest" else truth[:3]
    op = hessian_operator(model, nn.functional.cross_entropy, data)
    res = block_lanczos(op, 3, which, block_size=2, krylov_dim=16, tol=1e-7,
                        max_matvecs=1000)
    assert res.n_matvecs > 16  # it restarted
    assert res.converged
    assert torch.allclose(res.values, want, rtol=1e-6, atol=1e-8)


def test_block_lanczos_errors():
    A = _repeated(20)
    with pytest.raises(ValueError, match="krylov_dim must be >= k \\+ block_size"):
        block_lanczos(A, 3, block_size=4, krylov_dim=5)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        top_eigenvalues(A, 2, block_size=0)
