"""The Gauss-Newton trace: exact against dense matrices, its linearity check, its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.curvature import ggn_operator, hessian_operator, hessian_trace
from flatlab.curvature.gauss_newton import ggn_trace, nonlinear_tensors

CE = nn.functional.cross_entropy


def mlp(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 8), act(),
                         nn.Linear(8, 4)).double()


def batches(n: int = 30, d: int = 5, classes: int = 4, sizes=(13, 17)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes))))


class TinyResNet(nn.Module):
    """conv, eval-mode BatchNorm, ReLU, a residual addition, max and average pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = nn.functional.max_pool2d(h, 2)
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def dense_trace(model, loss_fn, data, params=None, kind="hessian") -> float:
    make = hessian_operator if kind == "hessian" else ggn_operator
    return float(torch.trace(make(model, loss_fn, data, params=params).to_dense()))


def test_a_relu_network_is_exact_on_unequal_batches():
    model, data = mlp(), batches()
    res = hessian_trace(model, CE, data, method="gauss_newton", progress=False)
    assert res.method == "gauss_newton" and res.converged and res.stderr == 0.0
    assert res.value == pytest.approx(dense_trace(model, CE, data), rel=1e-10, abs=1e-12)
    # cross-entropy's constant direction is skipped: 3 of 4 passes per batch
    assert res.n_matvecs == 2 * 3


def test_a_convolutional_residual_network_with_batchnorm_is_exact_and_untouched():
    torch.manual_seed(0)
    model = TinyResNet().double()
    with torch.no_grad():  # non-trivial running statistics, then eval mode
        model(torch.randn(16, 1, 6, 6, dtype=torch.float64))
    model.eval()
    model.bn1.train()  # a submodule's own flag must come back as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in (5, 7)]
    assert nonlinear_tensors(model, data) == []
    res = hessian_trace(model, CE, data, method="gauss_newton", progress=False)
    assert res.stderr == 0.0
    assert res.value == pytest.approx(dense_trace(model, CE, data), rel=1e-10)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.bn1.training and not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_the_gauss_newton_trace_is_exact_for_any_network(act, loss):
    model, data = mlp(act), batches()
    if loss == "mse":
        data = [(x, nn.functional.one_hot(y, 4).double()) for x, y in data]
        def loss_fn(o, t):
            return ((o - t) ** 2).mean()
    else:
        loss_fn = CE
    res = ggn_trace(model, loss_fn, data)
    assert res.converged and res.examples == 30 and res.per_example.shape == (30,)
    assert res.value == pytest.approx(dense_trace(model, loss_fn, data, kind="ggn"), rel=1e-10)


def test_the_check_names_exactly_the_tensors_entering_nonlinearly():
    # tanh after layers 0 and 2: the outputs are affine in the last layer only
    assert nonlinear_tensors(mlp(nn.Tanh), batches()) == ["0.weight", "0.bias", "2.weight",
                                                           "2.bias"]
    assert nonlinear_tensors(mlp(nn.ReLU), batches()) == []

    class Reused(nn.Module):  # a weight used twice on one path is quadratic in it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    torch.manual_seed(0)
    # W relu(W x + b) + b: quadratic in W, affine in b
    assert nonlinear_tensors(Reused().double(), batches(d=4)) == ["lin.weight"]


def test_a_tanh_network_estimates_the_residual_on_its_nonlinear_tensors():
    model, data = mlp(nn.Tanh), batches()
    truth = dense_trace(model, CE, data)
    # 40 + 8 + 64 + 8 = 120 nonlinear coordinates: 200 probes make the residual exact
    exact = hessian_trace(model, CE, data, method="gauss_newton", probes=200, progress=False)
    assert exact.value == pytest.approx(truth, rel=1e-10) and exact.stderr == 0.0
    assert exact.n_matvecs == 6 + 2 * 120  # the passes, then one H and one G product each
    covered = 0
    for seed in range(10):
        r = hessian_trace(model, CE, data, method="gauss_newton", probes=40, seed=seed,
                          progress=False)
        assert r.converged and 0 < r.stderr < float("inf")
        covered += abs(r.value - truth) <= 2 * r.stderr
    assert covered >= 8


def test_a_parameter_subset_is_the_principal_block():
    model, data = mlp(nn.Tanh), batches()
    params = ["2.weight", "4.weight"]
    res = hessian_trace(model, CE, data, method="gauss_newton", probes=200, params=params,
                        progress=False)
    assert res.value == pytest.approx(dense_trace(model, CE, data, params=params), rel=1e-10)


def test_a_budget_returns_the_examples_done_with_their_error():
    model, data = mlp(), batches()
    res = hessian_trace(model, CE, data, method="gauss_newton", max_matvecs=3, progress=False)
    assert not res.converged and res.n_matvecs == 3
    first = ggn_trace(model, CE, data[:1])  # the first batch of 13 examples alone
    assert res.value == pytest.approx(first.value, rel=1e-12)
    assert res.stderr == pytest.approx(float(first.per_example.std() / 13**0.5), rel=1e-12)


def test_refusals_name_the_problem():
    model, data = mlp(), batches()
    with pytest.raises(ValueError, match="needs a model with loss_fn and data, got Tensor"):
        hessian_trace(torch.eye(3), method="gauss_newton")
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0]).double())
    with pytest.raises(ValueError, match="mean of per-example terms"):
        hessian_trace(model, weighted, data, method="gauss_newton", progress=False)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    with pytest.raises(ValueError, match="one example at a time"):
        hessian_trace(bn, CE, data, method="gauss_newton", eval_mode=False, progress=False)
    with pytest.raises(ValueError, match="probes must be >= 4 for gauss_newton"):
        hessian_trace(model, CE, data, method="gauss_newton", probes=3, progress=False)
