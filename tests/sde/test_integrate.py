"""Batched Euler-Maruyama: Ornstein-Uhlenbeck moments, weak order 1, recording, seeding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flatlab.sde import SGDSDE, GaussianNoise, Quadratic, SignSGDSDE, simulate

F64 = torch.float64
THETA, S, X0, T = 1.5, 0.8, 1.0, 1.0


def ou(dim=1):
    """SGD's SDE on f = theta x^2 / 2 with lr = 1 is the OU process dX = -theta X dt + S dW."""
    return SGDSDE(Quadratic(torch.full((dim,), THETA, dtype=F64)), GaussianNoise(S), lr=1.0)


def exact_moments(t):
    mean = X0 * math.exp(-THETA * t)
    var = S**2 * (1 - math.exp(-2 * THETA * t)) / (2 * THETA)
    return mean, var


def test_ou_mean_and_variance_match_the_exact_process():
    dt, paths = 0.005, 100_000
    traj = simulate(ou(), torch.tensor([X0], dtype=F64), int(T / dt), paths=paths, dt=dt,
                    record_every=50, seed=0)
    for t, m, v in zip(traj.times.tolist(), traj["x_mean"][:, 0], traj["x_var"][:, 0]):
        mean, var = exact_moments(t)
        # Euler-Maruyama bias is O(dt) (~0.4% here); Monte Carlo error ~ sqrt(var / paths).
        assert abs(float(m) - mean) < 4 * math.sqrt(var / paths) + 0.01 * abs(mean) + 1e-12
        assert abs(float(v) - var) < 4 * var * math.sqrt(2 / paths) + 0.01 * var + 1e-12


def test_weak_error_shrinks_linearly_with_the_step():
    # Test function g(x) = x: E g(X_T) is known exactly and EM's bias is c dt + O(dt^2).
    exact_mean = exact_moments(T)[0]
    step_sizes = [0.2, 0.1, 0.05]
    errors = []
    for i, dt in enumerate(step_sizes):
        traj = simulate(ou(), torch.tensor([X0], dtype=F64), round(T / dt), paths=200_000,
                        dt=dt, record_every=10_000, seed=10 + i)
        errors.append(abs(float(traj["x_mean"][-1, 0]) - exact_mean))
    slope = np.polyfit(np.log(step_sizes), np.log(errors), 1)[0]
    assert 0.8 < slope < 1.2, (errors, slope)
    assert errors[-1] < errors[0] / 3


def test_records_every_k_steps_without_keeping_paths():
    q = Quadratic(torch.linspace(1, 2, 4, dtype=F64))
    traj = simulate(SignSGDSDE(q, GaussianNoise(1.0), 0.01), torch.ones(4, dtype=F64), 25,
                    paths=7, record_every=10, seed=0)
    assert traj.steps.tolist() == [0, 10, 20, 25]
    torch.testing.assert_close(traj.times, torch.tensor([0, 0.1, 0.2, 0.25], dtype=F64))
    assert traj["loss_mean"].shape == (4,) and traj["x_var"].shape == (4, 4)
    assert traj.final_state[0].shape == (7, 4)
    assert float(traj["loss_mean"][0]) == pytest.approx(0.5 * float(q.eigenvalues.sum()))


def test_same_seed_same_paths_and_custom_statistics():
    q = Quadratic(torch.ones(3, dtype=F64))

    def stats(state, loss):
        return {"x_max": state[0].max()}

    runs = [simulate(SGDSDE(q, GaussianNoise(1.0), 0.1), torch.zeros(3, dtype=F64), 5, paths=4,
                     statistics=stats, seed=s) for s in (1, 1, 2)]
    torch.testing.assert_close(runs[0]["x_max"], runs[1]["x_max"])
    assert not torch.equal(runs[0]["x_max"], runs[2]["x_max"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, r"steps must be >= 1, got 0"),
        ({"dt": -0.1}, r"dt must be > 0, got -0.1"),
        ({"record_every": 0}, r"record_every must be >= 1, got 0"),
        ({"x0": torch.zeros(5, 3, dtype=F64), "paths": 4}, r"x0 must have shape"),
        ({"x0": torch.zeros(2, dtype=F64)}, r"x0 must have dimension 3 .*got 2"),
        ({"x0": torch.zeros(3, dtype=F64), "paths": None}, r"paths must be given"),
    ],
)
def test_bad_arguments(kwargs, match):
    q = Quadratic(torch.ones(3, dtype=F64))
    args = {"x0": torch.zeros(3, dtype=F64), "steps": 3, "paths": 2, **kwargs}
    x0, steps = args.pop("x0"), args.pop("steps")
    with pytest.raises(ValueError, match=match):
        simulate(SGDSDE(q, GaussianNoise(1.0), 0.1), x0, steps, **args)
