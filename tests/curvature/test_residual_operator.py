"""The residual ``R = H - G`` as one operator: the Hessian of ``<r, f(w)>`` with the loss's
output gradient ``r`` held constant (:func:`flatlab.curvature.residual_operator`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.curvature import (
    ResidualOperator,
    ggn_operator,
    hessian_operator,
    residual_operator,
    top_eigenvalues,
)

from .conftest import Untouched, bn_dropout_problem, make_batches, problem

CE = nn.functional.cross_entropy


def _small():
    """A tanh MLP of 8-10-4 (134 parameters) on unequal batches of 13, 7 and 20."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 4)).double()
    return net, make_batches()


def _h_minus_g(model, loss_fn, data, params=None):
    H = hessian_operator(model, loss_fn, data, params=params).to_dense()
    return H - ggn_operator(model, loss_fn, data, params=params).to_dense()


@pytest.mark.parametrize(("method", "path"), [("double_backward", "cached"),
                                              ("double_backward", "streamed"),
                                              ("func", "streamed"),
                                              ("forward_ad", "streamed")])
def test_the_residual_is_the_hessian_minus_the_gauss_newton_matrix(method, path):
    model, data = _small()
    want = _h_minus_g(model, CE, data)
    op = residual_operator(model, CE, data, method=method, path=path)
    got = op.to_dense()
    assert isinstance(op, ResidualOperator) and op.path == path and op.method == method
    assert float(want.abs().max()) > 1e-3  # a tanh network's residual is not small
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # a block of columns (matmat: vmapped for func, a backward per column otherwise)
    V = torch.randn(want.shape[0], 3, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V), want @ V, rtol=0, atol=1e-10)


def test_a_parameter_subset_and_a_squared_error_loss():
    model, data = _small()
    mse = nn.functional.mse_loss
    reg = [(x, torch.nn.functional.one_hot(y, 4).double()) for x, y in data]
    for loss_fn, d in ((CE, data), (mse, reg)):
        want = _h_minus_g(model, loss_fn, d, params=model[0])
        for path in ("cached", "streamed"):
            got = residual_operator(model, loss_fn, d, params=model[0], path=path).to_dense()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_it_vanishes_where_the_outputs_are_affine_in_the_parameters():
    model, data, _ = problem("relu")
    # the last layer alone: the outputs are affine in it, so H = G on its block
    R = residual_operator(model, CE, data, params=model[4]).to_dense()
    assert float(R.abs().max()) < 1e-14


def test_a_batchnorm_dropout_model_is_measured_in_eval_mode_and_untouched():
    model, data = bn_dropout_problem(nn.Tanh)
    kept = Untouched(model)
    want = _h_minus_g(model, CE, data)
    for path in ("cached", "streamed"):
        torch.testing.assert_close(residual_operator(model, CE, data, path=path).to_dense(),
                                   want, rtol=0, atol=1e-10)
    kept.check()


def test_lanczos_on_the_residual_starts_at_random_and_finds_its_eigenvalues():
    model, data = _small()
    R = _h_minus_g(model, CE, data)
    res = top_eigenvalues(residual_operator(model, CE, data), 2, which="magnitude", tol=1e-9,
                          progress=False)
    assert res.start == "random" and res.converged
    ev = torch.linalg.eigvalsh(R)
    want = ev[ev.abs().argsort(descending=True)[:2]]
    torch.testing.assert_close(res.values, want, rtol=1e-8, atol=1e-10)


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x), x


def test_a_model_with_several_outputs_is_refused_with_one_line():
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    op = residual_operator(_Pair(), lambda out, t: CE(out[0], t), (x, y))
    with pytest.raises(ValueError, match="one tensor, got tuple"):
        op.matvec(torch.ones(op.shape[0]))
