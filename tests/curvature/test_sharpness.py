"""Sharpness measures against closed forms on quadratics, and their invariants."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatlab.curvature import (
    average_sharpness,
    domain_sharpness,
    first_order_flatness,
    gradient_norm,
    worst_case_sharpness,
)

from .conftest import make_batches, make_mlp, spectrum_matrix


class Quadratic(nn.Module):
    """``model(X) = X x``; with ``loss = mean(out^2) / 2`` the loss is ``x^T (X^T X / m) x / 2``."""

    def __init__(self, d: int, x0: torch.Tensor | None = None):
        super().__init__()
        self.x = nn.Parameter(torch.zeros(d, dtype=torch.float64) if x0 is None else x0)

    def forward(self, inputs):
        return inputs @ self.x


def half_mse(out, target):
    return 0.5 * ((out - target) ** 2).mean()


def quadratic_data(A: torch.Tensor):
    """Inputs ``X`` with ``X^T X / d = A`` (A PSD), zero targets."""
    d = A.shape[0]
    lam, Q = torch.linalg.eigh(A)
    X = (Q * lam.clamp_min(0).sqrt()) @ Q.T * d**0.5
    return X, torch.zeros(d, dtype=torch.float64)


LAM = torch.tensor([4.0, 1.5, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)


def test_worst_case_quadratic_closed_form():
    A = spectrum_matrix(LAM, seed=0)
    model, data = Quadratic(6), quadratic_data(A)
    for rho in (0.1, 0.5):
        s = worst_case_sharpness(model, half_mse, data, rho)
        assert abs(s.value / (rho**2 * 4.0 / 2) - 1) < 0.01
        assert s.loss == 0 and s.n_evals <= 21  # base point + 20 ascent steps
    # linf ball: the max of x^T A x / 2 over the cube is at a vertex; check against brute force
    s = worst_case_sharpness(model, half_mse, data, 0.1, norm="linf", steps=50)
    signs = torch.tensor([[(i >> k) & 1 for k in range(6)] for i in range(64)],
                         dtype=torch.float64) * 2 - 1
    brute = float((0.5 * 0.01 * ((signs @ A) * signs).sum(1)).max())
    assert s.value <= brute + 1e-12 and s.value >= 0.99 * brute


def test_first_order_flatness_quadratic():
    A = spectrum_matrix(LAM, seed=1)
    model, data = Quadratic(6), quadratic_data(A)
    r = first_order_flatness(model, half_mse, data, 0.2)
    assert abs(r.value / (0.2**2 * 4.0) - 1) < 0.01


def test_average_sharpness_quadratic():
    A = spectrum_matrix(LAM, seed=2)
    model, data = Quadratic(6), quadratic_data(A)
    r = average_sharpness(model, half_mse, data, 0.3, samples=4000)
    truth = 0.3**2 * float(LAM.sum()) / 2
    assert abs(r.value - truth) < 4 * r.stderr and abs(r.value / truth - 1) < 0.05


def test_domain_vs_pooled_ratio_is_two():
    d1 = quadratic_data(torch.diag(torch.tensor([10.0, 0.0], dtype=torch.float64)))
    d2 = quadratic_data(torch.diag(torch.tensor([0.0, 10.0], dtype=torch.float64)))
    model = Quadratic(2)
    res = domain_sharpness(model, half_mse, {"a": d1, "b": d2}, rho=0.1)
    assert abs(res.per_domain["a"] / (0.01 * 10 / 2) - 1) < 0.01
    assert abs(res.ratio - 2.0) < 0.02
    assert res.max == max(res.per_domain.values()) and res.value == res.mean
    fo = domain_sharpness(model, half_mse, [d1, d2], rho=0.1, measure="first_order")
    assert abs(fo.ratio - 2.0) < 0.02 and set(fo.per_domain) == {"0", "1"}


def test_adaptive_is_invariant_to_neuron_rescaling():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    scaled = copy.deepcopy(net)
    with torch.no_grad():  # rows of layer 1 times 10, columns of layer 2 over 10
        scaled[0].weight.mul_(10)
        scaled[0].bias.mul_(10)
        scaled[2].weight.div_(10)
    ce = nn.functional.cross_entropy
    a = worst_case_sharpness(net, ce, (x, y), 0.05, adaptive=True, norm="linf", steps=10)
    b = worst_case_sharpness(scaled, ce, (x, y), 0.05, adaptive=True, norm="linf", steps=10)
    assert abs(a.value - b.value) <= 1e-6 * abs(a.value)
    plain_a = worst_case_sharpness(net, ce, (x, y), 0.05)
    plain_b = worst_case_sharpness(scaled, ce, (x, y), 0.05)
    assert abs(plain_a.value - plain_b.value) > 0.1 * plain_a.value


def test_m_sharpness_and_gradient_norm():
    model = make_mlp("tanh")
    data = make_batches()
    full = worst_case_sharpness(model, nn.functional.cross_entropy, data, 0.05, steps=5)
    m = worst_case_sharpness(model, nn.functional.cross_entropy, data, 0.05, steps=5,
                             batchwise=True)
    assert m.measure.endswith("_m") and m.value > 0 and full.value > 0
    assert abs(m.loss - full.loss) < 1e-12  # size-weighted mean of batch losses = full loss
    g = gradient_norm(model, nn.functional.cross_entropy, data)
    ref = copy.deepcopy(model)
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    nn.functional.cross_entropy(ref(x), y).backward()
    truth = torch.cat([p.grad.reshape(-1) for p in ref.parameters()]).norm()
    assert abs(g.value - float(truth)) < 1e-12


def test_model_untouched_and_errors():
    model = make_mlp("relu")
    model.train()
    data = make_batches()
    before = copy.deepcopy(model.state_dict())
    ce = nn.functional.cross_entropy
    for fn in (worst_case_sharpness, average_sharpness, first_order_flatness):
        fn(model, ce, data, 0.05, **({"samples": 3} if fn is average_sharpness else {"steps": 3}))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="rho must be >= 0, got -1.0"):
        worst_case_sharpness(model, ce, data, -1)
    with pytest.raises(ValueError, match="norm must be one of"):
        worst_case_sharpness(model, ce, data, 0.1, norm="l1")
    with pytest.raises(ValueError, match="measure must be one of"):
        domain_sharpness(model, ce, [data], 0.1, measure="pac_bayes")
    with pytest.raises(ValueError, match="domains must hold at least one"):
        domain_sharpness(model, ce, {}, 0.1)
    with pytest.raises(ValueError, match="data is empty"):
        worst_case_sharpness(model, ce, [], 0.1)
