"""Comparison harness: the optimizer on many copies at once against its SDE."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.optim import RMSpropW, SignSGD
from flatlab.sde import (
    SGDSDE,
    AdamWSDE,
    GaussianNoise,
    NetworkObjective,
    Quadratic,
    RMSpropWSDE,
    SignSGDSDE,
    compare,
    optimizer_for,
    run_optimizer,
)

F64 = torch.float64
LAM = torch.tensor([0.5, 2.0, 4.0], dtype=F64)


def test_run_optimizer_is_independent_copies_of_the_optimizer():
    """Row i of the batched run equals a separate run fed the same noise row."""
    q, noise = Quadratic(LAM), GaussianNoise(torch.tensor([1.0, 0.5, 2.0], dtype=F64))
    x0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    traj = run_optimizer(lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1), q, noise, x0,
                         5, lr=0.1, seed=3)
    gen = torch.Generator().manual_seed(3)
    draws = [noise.sample(4, 3, generator=gen) for _ in range(5)]
    for i in range(4):
        p = x0[i:i + 1].clone()
        opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
        for z in draws:
            p.grad = LAM * p + z[i:i + 1]
            opt.step()
        torch.testing.assert_close(traj.final_state[0][i:i + 1], p)
    torch.testing.assert_close(traj.times, torch.arange(6, dtype=F64) * 0.1)


def test_optimizer_for_builds_the_matching_optimizer():
    q, noise = Quadratic(LAM), GaussianNoise(1.0)
    p = [torch.zeros(2, 3, dtype=F64)]
    assert isinstance(optimizer_for(SGDSDE(q, noise, 0.1))(p), torch.optim.SGD)
    opt = optimizer_for(SignSGDSDE(q, noise, 0.1, weight_decay=0.2))(p)
    assert isinstance(opt, SignSGD) and opt.param_groups[0]["weight_decay"] == 0.2
    opt = optimizer_for(RMSpropWSDE(q, noise, 0.1, beta=0.9, weight_decay=0.3))(p)
    assert isinstance(opt, RMSpropW) and opt.param_groups[0]["beta"] == 0.9
    opt = optimizer_for(AdamWSDE(q, noise, 0.1, betas=(0.8, 0.99), weight_decay=0.1))(p)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.99)
    with pytest.raises(ValueError, match="bias_correction must be True"):
        optimizer_for(AdamWSDE(q, noise, 0.1, bias_correction=False))


def test_compare_reports_the_relative_gap_on_matched_times():
    c = compare(SignSGDSDE(Quadratic(LAM), GaussianNoise(1.0), 0.01), torch.ones(3, dtype=F64),
                300, paths=400, record_every=30, substeps=2)
    torch.testing.assert_close(c.sde.times, c.discrete.times)
    a, b = c.sde["loss_mean"][1:], c.discrete["loss_mean"][1:]
    torch.testing.assert_close(c.gap, (a - b).abs() / b)
    assert c.mean_gap == pytest.approx(float(c.gap.mean())) and c.mean_gap < 0.05


@pytest.mark.parametrize("make_sde", [
    lambda obj, noise: SGDSDE(obj, noise, 0.05),
    lambda obj, noise: SignSGDSDE(obj, noise, 0.01),
], ids=["sgd", "signsgd"])
def test_small_network_with_injected_noise(make_sde):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = (torch.randn(64, 4, dtype=F64), torch.randint(0, 3, (64,)))
    obj = NetworkObjective(model, nn.functional.cross_entropy, data)
    sde = make_sde(obj, GaussianNoise(0.5))
    c = compare(sde, obj.initial_point(), 100, paths=100, record_every=10, seed=1)
    assert c.mean_gap < 0.03, c.gap
    assert float(c.discrete["loss_mean"][-1]) < 0.95 * float(c.discrete["loss_mean"][0])
