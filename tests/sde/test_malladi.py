"""Malladi et al.'s RMSprop / Adam SDEs against hand-written formulas and the newer SDEs."""

from __future__ import annotations

import math

import torch

from flatlab.optim import RMSpropW
from flatlab.sde import (
    AdamWSDE,
    GaussianNoise,
    MalladiAdamSDE,
    MalladiRMSpropSDE,
    Quadratic,
    RMSpropWSDE,
    compare,
    optimizer_for,
)

F64 = torch.float64
LAM = torch.tensor([0.5, 2.0, 4.0], dtype=F64)
STD = torch.tensor([1.0, 0.5, 2.0], dtype=F64)


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, generator=g, dtype=F64)
    m = torch.randn(4, 3, generator=g, dtype=F64)
    v = torch.rand(4, 3, generator=g, dtype=F64) + 0.1
    return x, m, v


def test_rmsprop_v_tracks_the_noise_variance_only():
    q, noise = Quadratic(LAM), GaussianNoise(STD)
    x, _, v = _state()
    old, new = MalladiRMSpropSDE(q, noise, 0.01, beta=0.99), RMSpropWSDE(q, noise, 0.01, beta=0.99)
    (dx_old, dv_old), (dx_new, dv_new) = old.drift(0.0, (x, v)), new.drift(0.0, (x, v))
    g = LAM * x
    assert torch.allclose(dx_old, dx_new)  # same x drift for the same V
    assert torch.allclose(dv_old, old.rho * (STD**2 - v))
    assert torch.allclose(dv_new - dv_old, new.rho * g * g)  # the newer SDE adds (grad f)^2
    z = torch.randn(4, 3, dtype=F64)
    x1, v1 = old.step(0.0, 0.01, (x, v), z)
    v_ref = v + old.rho * 0.01 * (STD**2 - v)
    x_ref = x - (0.01 * g + math.sqrt(0.01 * 0.01) * STD * z) / (v_ref.sqrt() + old.eps)
    assert torch.allclose(v1, v_ref) and torch.allclose(x1, x_ref)


def test_adam_drift_has_no_correction_term_and_v_tracks_the_noise_only():
    q, noise = Quadratic(LAM), GaussianNoise(STD)
    x, m, v = _state(1)
    kw = {"betas": (0.9, 0.99)}
    old, new = MalladiAdamSDE(q, noise, 0.01, **kw), AdamWSDE(q, noise, 0.01, **kw)
    t = 0.5
    i1, i2 = old.iota(t)
    g = LAM * x
    p = v.sqrt() + old.eps * math.sqrt(i2)
    dx_old, dm_old, dv_old = old.drift(t, (x, m, v))
    dx_new, dm_new, dv_new = new.drift(t, (x, m, v))
    assert torch.allclose(dx_old, -(math.sqrt(i2) / i1) * m / p)
    assert torch.allclose(dx_new - dx_old, -(math.sqrt(i2) / i1) * 0.01 * new.rho1 * (g - m) / p)
    assert torch.allclose(dm_old, dm_new)
    assert torch.allclose(dv_new - dv_old, new.rho2 * g * g)


def test_earlier_sdes_pair_with_the_same_discrete_optimizers():
    q, noise = Quadratic(LAM), GaussianNoise(STD)
    opt = optimizer_for(MalladiRMSpropSDE(q, noise, 0.01))([torch.zeros(2, 3, requires_grad=True)])
    assert isinstance(opt, RMSpropW)
    opt = optimizer_for(MalladiAdamSDE(q, noise, 0.01))([torch.zeros(2, 3, requires_grad=True)])
    assert isinstance(opt, torch.optim.AdamW)


def test_noise_dominated_regime_both_sdes_track_rmsprop():
    # sigma = 8 against gradients of size <= 4: the regime Malladi et al. derived theirs for
    q, noise = Quadratic(torch.tensor([1.0, 2.0], dtype=F64)), GaussianNoise(8.0)
    x0 = torch.full((2,), 0.5, dtype=F64)
    for cls in (MalladiRMSpropSDE, RMSpropWSDE):
        c = compare(cls(q, noise, 0.01, beta=0.99), x0, 1500, paths=400, record_every=50)
        tail = c.gap[-10:].mean()
        assert tail < 0.1, (cls.__name__, float(tail))
