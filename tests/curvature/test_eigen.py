"""Lanczos and power iteration against dense eigendecompositions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatlab.curvature import hessian_operator, lanczos, power_iteration, top_eigenvalues

from .conftest import dense_eigvalsh, make_mlp, problem

CE = nn.functional.cross_entropy


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()).abs() / b.double().abs()).max())


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_top5_and_bottom3_match_dense_float64(activation):
    model, data, H = problem(activation)
    truth = dense_eigvalsh(activation)
    op = hessian_operator(model, CE, data)
    top = top_eigenvalues(op, k=5, tol=1e-9)
    assert top.converged and top.values.shape == (5,) and top.vectors.shape == (H.shape[0], 5)
    assert _rel(top.values, truth.flip(0)[:5]) < 1e-6
    # eigenvector: sin(angle to the true one) <= ||H v - lambda v|| / gap (Davis-Kahan)
    v = top.vectors[:, 0]
    gap = float(truth[-1] - truth[-2])
    assert float((H @ v - top.values[0] * v).norm()) / gap < 0.04  # |cos| > 0.999
    assert float(top.residuals.max()) <= 1e-9 * float(top.values.abs().max())
    bottom = top_eigenvalues(op, k=3, which="smallest", tol=1e-9)
    assert bottom.converged
    assert _rel(bottom.values, truth[:3]) < 1e-6
    assert bottom.values[0] <= bottom.values[1] <= bottom.values[2]
    # the reported residuals are the true ones
    r = op.matvec(top.vectors[:, 0]) - top.values[0] * top.vectors[:, 0]
    assert float(r.norm()) <= 2e-9 * float(top.values[0]) + 1e-14


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_float32_model_within_1e_4(activation):
    model, data, H = problem(activation)
    model32 = copy.deepcopy(model).float()
    data32 = [(x.float(), y) for x, y in data]
    truth = dense_eigvalsh(activation)
    top = top_eigenvalues(model32, k=5, loss_fn=CE, data=data32)
    bottom = top_eigenvalues(model32, k=3, which="smallest", loss_fn=CE, data=data32)
    assert top.values.dtype == torch.float32 and top.converged and bottom.converged
    assert _rel(top.values, truth.flip(0)[:5]) < 1e-4
    assert _rel(bottom.values, truth[:3]) < 1e-4


def _spectrum_matrix(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([40.0, 25.0, 24.0, 10.0]),
                     torch.rand(n - 6, generator=g, dtype=torch.float64) * 2 - 1,
                     torch.tensor([-30.0, -5.0])])
    return (Q * lam) @ Q.T, torch.sort(lam).values


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_which_on_dense_matrix(which):
    A, lam = _spectrum_matrix()
    want = {"largest": lam.flip(0)[:3], "smallest": lam[:3],
            "magnitude": torch.tensor([40.0, -30.0, 25.0], dtype=torch.float64)}[which]
    res = lanczos(A, k=3, which=which, tol=1e-10)
    torch.testing.assert_close(res.values, want, rtol=1e-9, atol=0)
    pw = power_iteration(A, k=1, which=which, tol=1e-8)
    torch.testing.assert_close(pw.values, want[:1], rtol=1e-6, atol=0)


def test_restarts_and_budget():
    A, lam = _spectrum_matrix(n=400, seed=3)
    small = lanczos(A, k=4, krylov_dim=12, tol=1e-10)  # forces several thick restarts
    assert small.converged and small.n_matvecs > 12
    torch.testing.assert_close(small.values, lam.flip(0)[:4], rtol=1e-9, atol=0)
    capped = lanczos(A, k=4, max_matvecs=3)
    assert not capped.converged and capped.n_matvecs == 3


def test_lanczos_needs_fewer_products_than_power():
    A, _ = _spectrum_matrix(seed=1)
    lz = top_eigenvalues(A, k=1, tol=1e-6)
    pw = top_eigenvalues(A, k=1, tol=1e-6, method="power")
    assert lz.converged and pw.converged
    assert lz.n_matvecs * 3 < pw.n_matvecs


def test_warm_start_is_cheap():
    model, data, _ = problem("tanh")
    cold = top_eigenvalues(model, k=1, loss_fn=CE, data=data)
    warm = top_eigenvalues(model, k=1, loss_fn=CE, data=data, init=cold.vectors[:, 0])
    assert warm.converged and warm.n_matvecs <= 3 < cold.n_matvecs
    assert abs(warm.value - cold.value) <= 1e-9 * abs(cold.value)
    again = top_eigenvalues(model, k=1, loss_fn=CE, data=data, init=cold)  # a result works too
    assert again.n_matvecs == warm.n_matvecs


def test_full_dimension_and_degenerate():
    A = torch.diag(torch.tensor([2.0, 2.0, 1.0, -1.0], dtype=torch.float64))
    res = top_eigenvalues(A, k=4)  # k = n: the whole spectrum, repeated eigenvalue included
    torch.testing.assert_close(res.values, torch.tensor([2.0, 2.0, 1.0, -1.0],
                                                        dtype=torch.float64))
    assert res.converged


def test_errors():
    model = make_mlp("tanh")
    A = torch.eye(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="k must be <= the operator dimension n=5, got 6"):
        top_eigenvalues(A, k=6)
    with pytest.raises(ValueError, match="k must be >= 1"):
        top_eigenvalues(A, k=0)
    with pytest.raises(ValueError, match="which must be one of"):
        top_eigenvalues(A, which="biggest")
    with pytest.raises(ValueError, match="method must be one of"):
        top_eigenvalues(A, method="arnoldi")
    with pytest.raises(ValueError, match="init must have shape"):
        top_eigenvalues(A, init=torch.ones(3))
    with pytest.raises(ValueError, match="loss_fn and data must be given"):
        top_eigenvalues(model, k=1)
    with pytest.raises(TypeError, match="op must be"):
        top_eigenvalues([1, 2, 3])
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=f"k must be <= the operator dimension n={n}"):
        top_eigenvalues(model, k=n + 1, loss_fn=CE, data=(torch.randn(4, 8, dtype=torch.float64),
                                                         torch.zeros(4, dtype=torch.long)))


def test_bfloat16_model_runs_with_float32_basis():
    model, data, H = problem("tanh")
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    data16 = [(x.to(torch.bfloat16), y) for x, y in data]
    res = top_eigenvalues(model16, k=1, loss_fn=CE, data=data16)
    truth = float(dense_eigvalsh("tanh")[-1])
    assert res.converged and res.values.dtype == torch.float32
    assert abs(res.value - truth) < 0.05 * truth  # bf16 products: ~3 significant digits


def _separated(n: int, seed: int):
    """A symmetric matrix with a well-separated top (23.3, 13.8, 12.2) over a N(0, 4) bulk."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([23.3, 13.8, 12.2], dtype=torch.float64),
                     2 * torch.randn(n - 3, generator=g, dtype=torch.float64)])
    return (Q * lam) @ Q.T, lam.sort(descending=True).values


@pytest.mark.parametrize("k", [1, 3])
def test_value_stop_bounds_the_eigenvalue_error_with_fewer_products(k):
    """stop="value": the tolerance is on the eigenvalue (bound min(r, r^2/gap)), so a
    separated top converges to tol in fewer products than the residual rule needs."""
    fewer = 0
    for seed in range(6):
        A, lam = _separated(300, seed)
        by_res = top_eigenvalues(A, k, tol=1e-3, seed=seed)
        by_val = top_eigenvalues(A, k, tol=1e-3, seed=seed, stop="value")
        assert by_res.converged and by_val.converged
        assert _rel(by_val.values, lam[:k]) <= 1e-3 * lam[0] / lam[k - 1]
        assert by_val.n_matvecs <= by_res.n_matvecs
        fewer += by_val.n_matvecs < by_res.n_matvecs
        # the residual it stopped at is looser than tol, the eigenvalue is not
        assert float(by_val.residuals.max()) >= float(by_res.residuals.max())
    assert fewer >= 5


def test_value_stop_needs_single_vector_lanczos():
    A, _ = _separated(50, 0)
    with pytest.raises(ValueError, match="stop must be one of"):
        top_eigenvalues(A, stop="change")
    with pytest.raises(ValueError, match="stop='value' needs method='lanczos' and block_size=1"):
        top_eigenvalues(A, stop="value", method="power")
    with pytest.raises(ValueError, match="stop='value' needs method='lanczos' and block_size=1"):
        top_eigenvalues(A, 2, stop="value", block_size=2)
