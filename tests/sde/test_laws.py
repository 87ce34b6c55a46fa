"""Closed forms: values, phases and the scaling-rule calculator."""

from __future__ import annotations

import math

import pytest
import torch

from flatlab.sde import laws

F64 = torch.float64
LAM = torch.linspace(0.5, 5, 10, dtype=F64)


def test_stationary_loss_values():
    assert laws.sgd_stationary_loss(0.01, 4.0, dim=10) == pytest.approx(0.1)
    assert laws.signsgd_stationary_loss(0.01, 1.0, dim=10) == pytest.approx(
        0.01 / 4 * math.sqrt(math.pi / 2) * 10)
    assert laws.signsgd_stationary_loss(0.01, torch.ones(10), nu=1) == pytest.approx(
        math.pi / 8 * 0.01 * 10)
    # Student-t -> Gaussian as nu grows; slopes of the note's table.
    assert laws.sign_slope_at_zero(1e6) == pytest.approx(laws.sign_slope_at_zero(), rel=1e-5)
    assert laws.sign_slope_at_zero(2) == pytest.approx(0.7071, abs=1e-4)
    assert laws.adaptive_stationary_loss(0.01, LAM, 2.0, 0.5) == pytest.approx(0.0340, abs=1e-4)
    assert laws.adaptive_stationary_loss(0.01, LAM, 1.0, 0.0) == pytest.approx(0.025)
    assert laws.adamw_loss_bound(0.01, LAM, 1.0) == pytest.approx(0.06875)


def test_adaptive_loss_saturates_below_the_bound():
    values = [laws.adaptive_stationary_loss(0.01, LAM, s, 1.0) for s in (1, 4, 16, 64, 1e6)]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] < laws.adamw_loss_bound(0.01, LAM, 1.0)
    assert values[-1] == pytest.approx(laws.adamw_loss_bound(0.01, LAM, 1.0), rel=1e-4)


def test_phases():
    g = torch.tensor([3.0, 1.8, 1.0, -5.0], dtype=F64)
    assert laws.signsgd_phase(g, 1.0).tolist() == [1, 2, 3, 1]
    torch.testing.assert_close(laws.signal_to_noise(g, 2.0), g / (2 * math.sqrt(2)))


def test_scaling_rule_values_and_invariance_of_the_stationary_loss():
    r = laws.scaling_rule(4, lr=0.01, betas=(0.98, 0.999), weight_decay=0.5, eps=1e-8)
    assert r.lr == pytest.approx(0.02) and r.betas == pytest.approx((0.92, 0.996))
    assert r.weight_decay == pytest.approx(1.0) and r.eps == pytest.approx(5e-9)
    base = laws.adaptive_stationary_loss(0.01, LAM, 4.0, 0.5)
    scaled = laws.adaptive_stationary_loss(r.lr, LAM, 4.0 / 2, r.weight_decay)
    assert scaled == pytest.approx(base)
    sqrt_rule = laws.scaling_rule(4, lr=0.01, betas=(0.98,), weight_decay=0.5,
                                  scale_weight_decay=False)
    assert sqrt_rule.weight_decay == 0.5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"delta": 16, "betas": (0.9, 0.999)}, r"delta \* \(1 - betas\[0\]\) must be < 1, got 16"),
        ({"delta": 12, "betas": (0.95, 0.9)}, r"delta \* \(1 - betas\[1\]\) must be < 1"),
        ({"delta": 0}, r"delta must be > 0, got 0"),
        ({"delta": 2, "betas": (1.2,)}, r"betas\[0\] must be in"),
        ({"delta": 2, "weight_decay": -1.0}, r"weight_decay must be >= 0"),
    ],
)
def test_scaling_rule_refuses_invalid_results(kwargs, match):
    with pytest.raises(ValueError, match=match):
        laws.scaling_rule(lr=0.01, **kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: laws.sgd_stationary_loss(0.01, -1.0, dim=3), r"noise_var must be finite and >= 0"),
        (lambda: laws.sgd_stationary_loss(0.01, 1.0), r"dim must be given"),
        (lambda: laws.signsgd_stationary_loss(0.01, 1.0, dim=2, nu=0), r"nu must be > 0, got 0"),
        (lambda: laws.adaptive_stationary_loss(0.01, LAM, torch.ones(3)),
         r"noise_std must have 10 entries"),
        (lambda: laws.adamw_loss_bound(0.01, LAM, 0.0), r"weight_decay must be > 0"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
