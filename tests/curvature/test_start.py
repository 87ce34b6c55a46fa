"""Lanczos's start vector: the loss gradient mixed with a random vector (the default for the
top of the spectrum on a model's operator), the operator's ``gradient()``, and the choices."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatlab.curvature import ggn_operator, hessian_operator, lanczos, top_eigenvalues
from flatlab.curvature._model import flatten

from .conftest import Untouched, bn_dropout_problem, concat, dense_hessian, problem

CE = nn.functional.cross_entropy


def _autograd_gradient(model, data, params=None):
    x, y = concat(data)
    tensors = list(model.parameters()) if params is None else list(params)
    return flatten(list(torch.autograd.grad(CE(model(x), y), tensors)))


class _Recorder:
    """An operator that records the first vector it multiplies (and delegates the rest)."""

    def __init__(self, op):
        self.op, self.first = op, None
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device

    def gradient(self):
        return self.op.gradient()

    def matvec(self, v):
        if self.first is None:
            self.first = v.clone()
        return self.op.matvec(v)


@pytest.mark.parametrize("path", ["cached", "streamed"])
def test_the_gradient_is_the_full_data_mean_on_unequal_batches(mlp_problem, path):
    model, data, _ = mlp_problem
    op = hessian_operator(model, CE, data, path=path)
    torch.testing.assert_close(op.gradient(), _autograd_gradient(model, data), rtol=0,
                               atol=1e-12)
    assert op.path == path and op.n_matvecs == 0  # a gradient is not a product


def test_the_gradient_of_a_parameter_subset_and_of_the_ggn_operator():
    model, data, _ = problem("relu")
    want = _autograd_gradient(model, data, model[2].parameters())
    for op in (hessian_operator(model, CE, data, params=model[2], path="cached"),
               hessian_operator(model, CE, data, params=model[2], path="streamed"),
               ggn_operator(model, CE, data, params=model[2])):
        torch.testing.assert_close(op.gradient(), want, rtol=0, atol=1e-12)


def test_the_gradient_leaves_a_batchnorm_dropout_model_untouched():
    model, data = bn_dropout_problem()
    kept = Untouched(model)
    frozen = copy.deepcopy(model).eval()
    want = _autograd_gradient(frozen, data)
    for path in ("cached", "streamed"):
        got = hessian_operator(model, CE, data, path=path).gradient()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    kept.check()


def test_the_default_start_is_the_mixed_gradient_and_finds_the_dense_eigenvalues(mlp_problem):
    model, data, H = mlp_problem
    default = lanczos(hessian_operator(model, CE, data), 3, tol=1e-9, seed=5)
    rec = _Recorder(hessian_operator(model, CE, data))
    res = lanczos(rec, 3, tol=1e-9, seed=5, init="gradient")
    assert default.start == res.start == "gradient" and res.converged
    assert default.n_matvecs == res.n_matvecs and torch.equal(default.values, res.values)
    g = _autograd_gradient(model, data)
    r = torch.randn(g.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = g / g.norm() + r / r.norm()
    torch.testing.assert_close(rec.first, q / q.norm(), rtol=0, atol=1e-12)
    want = torch.linalg.eigvalsh(H).flip(0)[:3]
    torch.testing.assert_close(res.values, want, rtol=1e-8, atol=1e-10)


def test_cached_and_streamed_paths_start_alike_and_agree(mlp_problem):
    model, data, _ = mlp_problem
    out = [top_eigenvalues(hessian_operator(model, CE, data, path=p), 2, tol=1e-9,
                           progress=False) for p in ("cached", "streamed")]
    assert [r.start for r in out] == ["gradient", "gradient"]
    assert out[0].n_matvecs == out[1].n_matvecs
    torch.testing.assert_close(out[0].values, out[1].values, rtol=1e-10, atol=1e-12)


def test_which_selects_the_start_and_init_overrides_it(mlp_problem):
    model, data, H = mlp_problem
    evals = torch.linalg.eigvalsh(H)
    op = hessian_operator(model, CE, data)
    low = top_eigenvalues(op, 1, which="smallest", tol=1e-8, progress=False)
    assert low.start == "random"
    torch.testing.assert_close(low.values[0], evals[0], rtol=1e-7, atol=1e-9)
    assert top_eigenvalues(op, 1, which="magnitude", tol=1e-6, progress=False).start \
        == "gradient"
    plain = top_eigenvalues(op, 1, init="random", seed=2, progress=False)
    rec = _Recorder(hessian_operator(model, CE, data))
    lanczos(rec, 1, init="random", seed=2)
    r = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert plain.start == "random"
    torch.testing.assert_close(rec.first, r / r.norm(), rtol=0, atol=0)
    warm = top_eigenvalues(op, 1, init=plain, progress=False)
    assert warm.start == "given" and warm.n_matvecs <= 2
    forced = top_eigenvalues(op, 1, which="smallest", init="gradient", tol=1e-8, progress=False)
    assert forced.start == "gradient"
    torch.testing.assert_close(forced.values[0], evals[0], rtol=1e-7, atol=1e-9)


def test_the_gauss_newton_operator_starts_at_random_unless_asked(mlp_problem):
    model, data, _ = mlp_problem
    G = ggn_operator(model, CE, data).to_dense()
    top = torch.linalg.eigvalsh(G)[-1]
    plain = top_eigenvalues(ggn_operator(model, CE, data), 1, tol=1e-9, progress=False)
    asked = top_eigenvalues(ggn_operator(model, CE, data), 1, tol=1e-9, init="gradient",
                            progress=False)
    assert (plain.start, asked.start) == ("random", "gradient")
    for res in (plain, asked):
        torch.testing.assert_close(res.values[0], top, rtol=1e-8, atol=0)


def test_a_tensor_starts_at_random_and_a_named_start_needs_lanczos():
    A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    assert top_eigenvalues(A, 2, progress=False).start == "random"
    with pytest.raises(ValueError, match="init='gradient' needs an operator built from a mod"):
        top_eigenvalues(A, 1, init="gradient", progress=False)
    with pytest.raises(ValueError, match="init must be one of"):
        top_eigenvalues(A, 1, init="grad", progress=False)
    for kw in ({"method": "power"}, {"block_size": 2}):
        with pytest.raises(ValueError, match="a start by name .* is Lanczos's"):
            top_eigenvalues(A, 1, init="random", progress=False, **kw)
        assert top_eigenvalues(A, 1, progress=False, **kw).start == "random"
        warm = top_eigenvalues(A, 1, init=torch.ones(10, dtype=torch.float64),
                               progress=False, **kw)
        assert warm.start == "given"


def test_a_zero_gradient_falls_back_to_the_random_start():
    """A linear model fitted exactly (squared error, targets = its outputs): g = 0, H != 0."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    mse = nn.functional.mse_loss
    rec = _Recorder(hessian_operator(model, mse, (x, y)))
    res = lanczos(rec, 1, tol=1e-10, seed=1, init="gradient")
    assert res.start == "random" and res.converged
    r = torch.randn(rec.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(rec.first, r / r.norm(), rtol=0, atol=0)
    H = dense_hessian(model, mse, (x, y))
    torch.testing.assert_close(res.values[0], torch.linalg.eigvalsh(H)[-1], rtol=1e-9, atol=0)
