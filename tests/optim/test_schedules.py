"""rho schedules: values, composition with a torch LR scheduler, use inside the optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from flatlab.optim import SAM, Constant, CosineWarmup, LinearWarmup, ProportionalToLR


def test_values():
    assert [Constant(0.1)(t, 1.0) for t in (0, 99)] == [0.1, 0.1]
    lin = LinearWarmup(0.2, warmup_steps=4, start=0.1)
    assert [lin(t, 1.0) for t in (0, 2, 4, 10)] == pytest.approx([0.1, 0.15, 0.2, 0.2])
    cos = CosineWarmup(0.2, warmup_steps=4)
    assert [cos(t, 1.0) for t in (0, 2, 4, 9)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    prop = ProportionalToLR(0.1, max_lr=1.0, min_value=0.02, min_lr=0.0)
    assert prop(0, 1.0) == pytest.approx(0.1) and prop(0, 0.5) == pytest.approx(0.06)


def test_proportional_follows_any_lr_scheduler():
    model = torch.nn.Linear(2, 1)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=ProportionalToLR(0.05, max_lr=0.1), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        backward(loss)
        return loss

    for t in range(10):
        lr_now = opt.param_groups[0]["lr"]
        opt.step(closure)
        assert opt.radius("rho") == pytest.approx(0.05 * lr_now / 0.1)
        assert lr_now == pytest.approx(0.05 * (1 + math.cos(math.pi * t / 10)))
        sched.step()


def test_warmup_is_indexed_by_the_optimizer_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = SAM([p], torch.optim.SGD, rho=LinearWarmup(0.3, warmup_steps=3), lr=0.1)

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = (p**2).sum()
        backward(loss)
        return loss

    seen = []
    for _ in range(5):
        opt.step(closure)
        seen.append(opt.radius("rho"))
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.3])


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: Constant(-0.1), ValueError, "value must be >= 0, got -0.1"),
        (lambda: LinearWarmup(0.1, warmup_steps=0), ValueError, "warmup_steps must be >= 1, got 0"),
        (lambda: LinearWarmup(0.1, warmup_steps=2.5), TypeError, "warmup_steps must be an int"),
        (lambda: ProportionalToLR(0.1, max_lr=0.0), ValueError, "max_lr must be > min_lr"),
    ],
)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
