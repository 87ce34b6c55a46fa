"""Shared small problems with dense (exact) Hessians for the curvature tests."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.func import functional_call

from flatlab.curvature._model import flatten, unflatten


def make_mlp(activation: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    # 8*40+40 + 40*40+40 + 40*4+4 = 2164 parameters
    net = nn.Sequential(nn.Linear(8, 40), act(), nn.Linear(40, 40), act(), nn.Linear(40, 4))
    return net.to(dtype)


def make_batches(dtype: torch.dtype = torch.float64, sizes=(13, 7, 20), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        x = torch.randn(n, 8, generator=g, dtype=torch.float64).to(dtype)
        y = torch.randint(0, 4, (n,), generator=g)
        out.append((x, y))
    return out


def concat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def dense_hessian(model: nn.Module, loss_fn, data, names=None) -> torch.Tensor:
    """Dense Hessian of loss_fn(model(x), y) on one (x, y) pair (model in float64)."""
    named = dict(model.named_parameters())
    names = list(named) if names is None else names
    like = [named[n].detach().double() for n in names]
    fixed = {k: v.detach().double() for k, v in named.items() if k not in names}
    x, y = data
    x = x.double()

    def f(theta):
        state = dict(fixed)
        state.update(zip(names, unflatten(theta, like)))
        return loss_fn(functional_call(model, state, (x,)), y)

    return torch.autograd.functional.hessian(f, flatten(like), vectorize=True)


def bn_dropout_problem(act: type[nn.Module] = nn.ReLU):
    """A float64 Linear-BatchNorm-``act``-Dropout-Linear model in training mode, with
    non-trivial running statistics, and 30 examples as unequal batches of 17 and 13."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), act(), nn.Dropout(0.5),
                          nn.Linear(6, 3)).double().train()
    x, y = torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,))
    model(x)
    return model, [(x[:17], y[:17]), (x[17:], y[17:])]


class Untouched:
    """Snapshot of a model's state, module flags and ``.grad``; :meth:`check` asserts that a
    measurement left all of them as they were."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.flags = [m.training for m in model.modules()]

    def check(self) -> None:
        assert [m.training for m in self.model.modules()] == self.flags
        assert all(p.grad is None for p in self.model.parameters())
        for k, v in self.model.state_dict().items():
            assert torch.equal(v, self.state[k]), k


@functools.cache
def problem(activation: str):
    """(model float64, batches, dense H) for a tanh or ReLU MLP, built once per session."""
    model = make_mlp(activation)
    data = make_batches()
    H = dense_hessian(model, nn.functional.cross_entropy, concat(data))
    return model, data, H


@pytest.fixture(autouse=True)
def _one_thread():
    """The test machine's cores are shared; one intra-op thread is several times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["tanh", "relu"])
def mlp_problem(request):
    return problem(request.param)


@functools.cache
def dense_eigvalsh(activation: str) -> torch.Tensor:
    """Ascending eigenvalues of :func:`problem`'s dense Hessian (cached)."""
    return torch.linalg.eigvalsh(problem(activation)[2])


def dense_ggn(model: nn.Module, loss_fn, data) -> torch.Tensor:
    """Dense generalized Gauss-Newton ``J^T H_ell J`` on one (x, y) pair (float64 model)."""
    from torch.func import jacrev

    x, y = data
    names = [k for k, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]

    def net(theta):
        return functional_call(model, dict(zip(names, unflatten(theta, like))), (x,))

    theta = flatten(like)
    J = jacrev(net)(theta).reshape(-1, theta.numel())
    out = net(theta).detach()
    HL = torch.autograd.functional.hessian(lambda o: loss_fn(o.view(out.shape), y),
                                           out.reshape(-1))
    return J.T @ HL @ J


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64)."""
    n = eigenvalues.numel()
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * eigenvalues.double()) @ Q.T
