"""T5 with real noise: the AdamW scaling rule on a network's own minibatch noise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flatlab.experiments._sde_real import real_noise_scaling, signal_share
from flatlab.sde.laws import scaling_rule


def test_signal_share_matches_a_per_example_loop() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    rows = []
    for i in range(40):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(rows)  # (N, P)
    signal, noise = float(g.mean(0).pow(2).sum()), float(g.var(0).sum())
    got = signal_share(model, (x, y), [1, 8, 40])
    for b in (1, 8, 40):
        assert got[b] == pytest.approx(signal / (signal + noise / b), rel=1e-5)
    assert got[1] < got[8] < got[40] < 1  # a larger batch averages the noise away


def test_arms_are_paired_and_use_the_rule() -> None:
    res = real_noise_scaling(None, deltas=[4], steps=64, seeds=2, evals=8)
    assert len(res.arms) == 2 * 3
    assert list(res.signal) == [8 * k for k in range(0, 64 + 1, 8)]  # samples, 9 points
    assert all(set(v) == {8, 32} and v[8] < v[32] for v in res.signal.values())
    rule = scaling_rule(4, lr=1e-3, betas=(0.98, 0.999), weight_decay=0.1)
    for s in (0, 1):
        arms = {a.name: a for a in res.arms if a.seed == s}
        assert (arms["rule"].lr, arms["rule"].betas, arms["rule"].weight_decay) == (
            rule.lr, rule.betas, rule.weight_decay)
        assert (arms["control"].lr, arms["control"].betas) == (1e-3, (0.98, 0.999))
        assert arms["base"].steps * arms["base"].batch == arms["rule"].steps * arms["rule"].batch
        # the same initialization: the first evaluation (step 0) agrees across the arms
        firsts = {a.curve[0] for a in arms.values()}
        assert len({round(v, 12) for _, v in firsts}) == 1 and {k for k, _ in firsts} == {0}
        assert all(math.isfinite(a.late_loss) for a in arms.values())
    claims = [v.gate.claim for v in res.verdicts]
    assert len(claims) == 3 and "closer to the base than the unscaled control" in claims[2]
    assert [r["arm"] for r in res.rows()] == ["rule", "control"]
    with pytest.raises(ValueError, match="deltas must be >= 2, divide steps=64"):
        real_noise_scaling(None, deltas=[3], steps=64, seeds=2)
