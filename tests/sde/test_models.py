"""SDE models: coefficients against hand-written formulas and the discrete updates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flatlab.optim import RMSpropW
from flatlab.sde import (
    SGDSDE,
    AdamWSDE,
    FunctionObjective,
    GaussianNoise,
    NetworkObjective,
    Quadratic,
    RMSpropWSDE,
    SignSGDSDE,
    StudentTNoise,
    student_t_sign_mean,
)

F64 = torch.float64
LAM = torch.tensor([0.5, 2.0, 4.0], dtype=F64)
STD = torch.tensor([1.0, 0.5, 2.0], dtype=F64)


def points(paths=5, seed=0):
    return torch.randn(paths, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_sgd_coefficients_and_step():
    x, z = points(), points(seed=1)
    sde = SGDSDE(Quadratic(LAM), GaussianNoise(STD), lr=0.1)
    (b,) = sde.drift(0.0, (x,))
    torch.testing.assert_close(b, -LAM * x)
    (s,) = sde.diffusion(0.0, (x,), z)
    torch.testing.assert_close(s, math.sqrt(0.1) * STD * z)
    (x1,) = sde.step(0.0, 0.01, (x,), z)
    torch.testing.assert_close(x1, x + 0.01 * b + math.sqrt(0.1 * 0.01) * STD * z)


def test_sgd_order2_drift_is_gradient_of_modified_loss():
    def f(p):
        return (p**4).sum() / 4 + p[0] * p[1]

    lr = 0.2
    sde = SGDSDE(FunctionObjective(f, 3), GaussianNoise(1.0), lr, order=2)
    x = points()
    (b,) = sde.drift(0.0, (x,))

    def modified(p):
        g = torch.func.grad(f)(p)
        return f(p) + lr / 4 * (g * g).sum()

    torch.testing.assert_close(b, -torch.func.vmap(torch.func.grad(modified))(x))


@pytest.mark.parametrize("noise", [GaussianNoise(STD), StudentTNoise(1.5, STD)])
def test_signsgd_closed_form(noise):
    x, z = points(), points(seed=2)
    sde = SignSGDSDE(Quadratic(LAM), noise, lr=0.05, weight_decay=0.1)
    y = LAM * x / STD
    if isinstance(noise, GaussianNoise):
        m = torch.erf(y / math.sqrt(2))
    else:
        m = student_t_sign_mean(y, 1.5)
    (b,) = sde.drift(0.0, (x,))
    torch.testing.assert_close(b, -m - 0.1 * x)
    (s,) = sde.diffusion(0.0, (x,), z)
    torch.testing.assert_close(s, math.sqrt(0.05) * torch.sqrt(1 - m * m) * z)
    (x1,) = sde.step(0.0, 0.05, (x,), z)
    torch.testing.assert_close(x1, x + 0.05 * b + math.sqrt(0.05) * s)


def test_signsgd_monte_carlo_form_matches_closed_form():
    x = points(paths=2, seed=3)
    gen = torch.Generator().manual_seed(4)
    mc = SignSGDSDE(Quadratic(LAM), GaussianNoise(STD), 0.05, form="monte_carlo",
                    mc_samples=100_000, generator=gen)
    closed = SignSGDSDE(Quadratic(LAM), GaussianNoise(STD), 0.05)
    torch.testing.assert_close(mc.drift(0.0, (x,))[0], closed.drift(0.0, (x,))[0],
                               atol=0.01, rtol=0)
    # Diffusion covariance: s s^T from the Monte Carlo square root vs diag(1 - m^2).
    _, spread = mc._mean_and_spread(x)
    cov = torch.einsum("pmd,pme->pde", spread, spread)
    m = closed.drift(0.0, (x,))[0]
    torch.testing.assert_close(cov, torch.diag_embed(1 - m * m), atol=0.01, rtol=0)
    assert mc.noise_dim() == 100_000 and closed.noise_dim() == 3


def test_signsgd_full_covariance_uses_monte_carlo_and_correlates_signs():
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64)
    sde = SignSGDSDE(Quadratic(torch.ones(2, dtype=F64)), GaussianNoise(cov=cov), 0.1,
                     mc_samples=50_000, generator=torch.Generator().manual_seed(0))
    assert sde.form == "monte_carlo"
    _, spread = sde._mean_and_spread(torch.zeros(1, 2, dtype=F64))
    c = torch.einsum("pmd,pme->pde", spread, spread)[0]
    # At zero gradient the sign correlation is (2/pi) asin(0.9) (Sheppard's formula).
    assert float(c[0, 1]) == pytest.approx(2 / math.pi * math.asin(0.9), abs=0.02)
    with pytest.raises(ValueError, match="form must be 'monte_carlo'"):
        SignSGDSDE(Quadratic(torch.ones(2, dtype=F64)), GaussianNoise(cov=cov), 0.1, form="closed")


def test_rmspropw_step_with_dt_lr_and_no_noise_is_the_discrete_update():
    x = points()
    sde = RMSpropWSDE(Quadratic(LAM), GaussianNoise(0.0), lr=0.01, beta=0.9, weight_decay=0.3,
                      eps=1e-3)
    state = sde.initial_state(x)
    p = x.clone()
    opt = RMSpropW([p], lr=0.01, beta=0.9, eps=1e-3, weight_decay=0.3)
    for k in range(3):
        state = sde.step(k * 0.01, 0.01, state, torch.zeros_like(x))
        p.grad = LAM * p
        opt.step()
    torch.testing.assert_close(state[0], p)
    torch.testing.assert_close(state[1], opt.state[p]["square_avg"])


def test_rmspropw_and_adamw_coefficients():
    x, z = points(), points(seed=5)
    m, v = points(seed=6), points(seed=7) ** 2
    g = LAM * x
    rms = RMSpropWSDE(Quadratic(LAM), GaussianNoise(STD), 0.01, beta=0.99, weight_decay=0.2)
    bx, bv = rms.drift(0.0, (x, v))
    p = v.sqrt() + 1e-8
    torch.testing.assert_close(bx, -g / p - 0.2 * x)
    torch.testing.assert_close(bv, 1.0 * (g * g + STD**2 - v))
    torch.testing.assert_close(rms.diffusion(0.0, (x, v), z)[0], -math.sqrt(0.01) * STD * z / p)

    adam = AdamWSDE(Quadratic(LAM), GaussianNoise(STD), 0.01, betas=(0.9, 0.999),
                    weight_decay=0.5, eps=1e-6)
    t = 0.7
    i1, i2 = 1 - math.exp(-10 * t), 1 - math.exp(-0.1 * t)
    bx, bm, bv = adam.drift(t, (x, m, v))
    pa = v.sqrt() + 1e-6 * math.sqrt(i2)
    torch.testing.assert_close(bx, -(math.sqrt(i2) / i1) * (m + 0.1 * (g - m)) / pa - 0.5 * x)
    torch.testing.assert_close(bm, 10 * (g - m))
    torch.testing.assert_close(bv, 0.1 * (g * g + STD**2 - v))
    sx, sm, sv = adam.diffusion(t, (x, m, v), z)
    torch.testing.assert_close(sm, math.sqrt(0.01) * 10 * STD * z)
    assert float(sx.abs().max()) == 0 and float(sv.abs().max()) == 0


def test_network_objective_gradient_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = (torch.randn(16, 3, dtype=F64), torch.randint(0, 2, (16,)))
    obj = NetworkObjective(model, nn.functional.cross_entropy, [(data[0][:6], data[1][:6]),
                                                                (data[0][6:], data[1][6:])])
    theta = obj.initial_point()
    loss = nn.functional.cross_entropy(model(data[0]), data[1])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    flat = torch.cat([gr.reshape(-1) for gr in grads])
    x = torch.stack([theta, theta + 0.1])
    torch.testing.assert_close(obj.loss(x)[0], loss.detach())
    torch.testing.assert_close(obj.grad(x)[0], flat)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: SGDSDE(Quadratic(LAM), StudentTNoise(1.0), 0.1), ValueError,
         r"finite noise covariance \(Student-t nu > 2\), got nu=1"),
        (lambda: SGDSDE(Quadratic(LAM), GaussianNoise(1.0), -0.1), ValueError, r"lr must be > 0"),
        (lambda: SGDSDE(Quadratic(LAM), GaussianNoise(1.0), 0.1, order=3), ValueError,
         r"order must be 1 or 2, got 3"),
        (lambda: SignSGDSDE(Quadratic(LAM), GaussianNoise(torch.ones(4)), 0.1), ValueError,
         r"noise dimension must match the parameter dimension 3, got 4"),
        (lambda: AdamWSDE(Quadratic(LAM), GaussianNoise(1.0), 0.1, betas=(1.0, 0.9)), ValueError,
         r"betas\[0\] must be in \[0.0, 1.0\), got 1.0"),
        (lambda: RMSpropWSDE(Quadratic(LAM), GaussianNoise(1.0), 0.1, weight_decay=-1), ValueError,
         r"weight_decay must be >= 0, got -1"),
        (lambda: SignSGDSDE(Quadratic(LAM), GaussianNoise(1.0), 0.1, form="exact"), ValueError,
         r"form must be one of"),
        (lambda: Quadratic(LAM).grad(torch.zeros(2, 4, dtype=F64)), ValueError,
         r"x must have shape \(paths, 3\), got \(2, 4\)"),
    ],
)
def test_bad_input(build, error, match):
    with pytest.raises(error, match=match):
        build()
