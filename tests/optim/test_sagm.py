"""SAGM: the update kernel on float64 quadratics (exact), rho=alpha=0, pass counts, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatlab.optim.sagm import sagm_gradient
from tests.optim.test_dgsam import _grad, _problem

S = 3


@pytest.mark.parametrize(("rho", "alpha"), [(0.3, 0.0), (0.3, 0.01), (0.05, 0.1)])
def test_combined_gradient_matches_hand_computation(rho, alpha):
    params, closures, mats, centers, theta, visited = _problem(seed=7)
    combined, losses = sagm_gradient(params, closures, rho=rho, alpha=alpha)
    g = np.mean([_grad(mats, centers, d, theta) for d in range(S)], axis=0)
    x = theta + (rho / (np.linalg.norm(g) + 1e-12) - alpha) * g
    g_p = np.mean([_grad(mats, centers, d, x) for d in range(S)], axis=0)
    np.testing.assert_allclose(torch.cat(combined).numpy(), (g + g_p) / 2, rtol=1e-12, atol=1e-12)
    # evaluation points: S at theta, then S at the perturbed point
    for _d, point in visited[:S]:
        np.testing.assert_allclose(point, theta, rtol=0, atol=0)
    for _d, point in visited[S:]:
        np.testing.assert_allclose(point, x, rtol=0, atol=1e-12)
    assert len(visited) == 2 * S and len(losses) == S
    assert np.array_equal(torch.cat([p.detach() for p in params]).numpy(), theta)


def test_rho_alpha_zero_is_the_mean_domain_gradient_exactly():
    params, closures, mats, centers, theta, _ = _problem(seed=8)
    combined, _ = sagm_gradient(params, closures, rho=0.0, alpha=0.0)
    plain, _ = sagm_gradient(params, closures, rho=0.0, alpha=0.0)
    erm = np.mean([_grad(mats, centers, d, theta) for d in range(S)], axis=0)
    np.testing.assert_allclose(torch.cat(combined).numpy(), erm, rtol=1e-12, atol=1e-12)
    for a, b in zip(combined, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho": -1.0, "alpha": 0.0}, ValueError, "rho must be >= 0, got -1.0"),
        ({"rho": 0.1, "alpha": float("nan")}, ValueError, "alpha must not be NaN"),
        ({"rho": 0.1, "alpha": "x"}, TypeError, "alpha must be a real number"),
        ({"rho": 0.1, "alpha": 0.0, "eps": -1.0}, ValueError, "eps must be > 0"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    params, closures, *_ = _problem()
    with pytest.raises(error, match=match):
        sagm_gradient(params, closures, **kwargs)


def test_empty_closure_list_is_rejected():
    params, *_ = _problem()
    with pytest.raises(ValueError, match="empty list"):
        sagm_gradient(params, [], rho=0.1, alpha=0.0)


from flatlab.optim.sagm import SAGM  # noqa: E402


def test_class_step_is_base_step_with_combined_gradient():
    params, closures, mats, centers, theta, _ = _problem(seed=13)
    rho, alpha, lr = 0.2, 0.01, 0.1
    opt = SAGM(params, torch.optim.SGD, rho=rho, alpha=alpha, lr=lr)
    loss = opt.step(closures)
    g = np.mean([_grad(mats, centers, d, theta) for d in range(S)], axis=0)
    x = theta + (rho / np.linalg.norm(g) - alpha) * g
    g_p = np.mean([_grad(mats, centers, d, x) for d in range(S)], axis=0)
    got = torch.cat([p.detach() for p in params]).numpy()
    np.testing.assert_allclose(got, theta - lr * (g + g_p) / 2, rtol=1e-12, atol=1e-12)
    losses = [0.5 * (theta - c) @ a @ (theta - c) for a, c in zip(mats, centers)]
    assert float(loss) == pytest.approx(np.mean(losses), rel=1e-12)
    assert opt.per_domain and opt.closure_calls == 2 * S


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rho": -0.5}, "rho must be >= 0"), ({"alpha": -1e-3}, "alpha must be >= 0"),
     ({"eps": 0.0}, "eps must be > 0")],
)
def test_class_bad_arguments(kwargs, match):
    params, *_ = _problem()
    with pytest.raises(ValueError, match=match):
        SAGM(params, torch.optim.SGD, lr=0.1, **kwargs)
