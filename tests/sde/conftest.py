"""Shared setup of the flatlab.sde tests: one intra-op thread (the tensors are small, and
threads only add contention) and the issue's quadratic."""

from __future__ import annotations

import pytest
import torch

from flatlab.sde import GaussianNoise, Quadratic, StudentTNoise, grouped_loss_statistics

D = 10
LAMBDA = torch.linspace(0.5, 5, D, dtype=torch.float64)
X0 = torch.full((D,), 2.0, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def stacked(sigmas, nu=None):
    """The issue's quadratic repeated once per noise level (block ``j`` has noise
    ``sigmas[j]``): objective, noise, ``x0`` and the statistics giving one loss per level."""
    k = len(sigmas)
    lam = LAMBDA.repeat(k)
    scale = torch.tensor(sigmas, dtype=torch.float64).repeat_interleave(D)
    noise = GaussianNoise(scale) if nu is None else StudentTNoise(nu, scale)
    return Quadratic(lam), noise, X0.repeat(k), grouped_loss_statistics(lam, k)


def tail(traj, name="group_loss", fraction=1 / 3):
    """Time average over the last ``fraction`` of the records, per group."""
    values = traj.stats[name]
    n = max(1, int(round(values.shape[0] * fraction)))
    return values[-n:].mean(0)
