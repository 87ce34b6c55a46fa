"""Noise models: sample statistics, sign means against scipy, batch scaling, bad input."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from flatlab.sde import GaussianNoise, StudentTNoise, student_t_sign_mean

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_gaussian_diagonal_sample_moments():
    std = torch.tensor([0.5, 1.0, 3.0], dtype=F64)
    z = GaussianNoise(std).sample(200_000, 3, generator=gen())
    assert z.shape == (200_000, 3)
    torch.testing.assert_close(z.std(0), std, rtol=0.01, atol=0)
    assert z.mean(0).abs().max() < 4 * 3.0 / math.sqrt(200_000)


def test_gaussian_full_covariance_sample_and_marginal_sign_mean():
    a = torch.tensor([[2.0, 0.0], [1.5, 0.5]], dtype=F64)
    cov = a @ a.T
    noise = GaussianNoise(cov=cov)
    assert not noise.independent
    z = noise.sample(200_000, 2, generator=gen(1))
    torch.testing.assert_close(torch.cov(z.T), cov, rtol=0.02, atol=0.02)
    g = torch.tensor([[0.7, -1.2]], dtype=F64)
    mc = torch.sign(g + z).mean(0)
    torch.testing.assert_close(noise.sign_mean(g)[0], mc, atol=0.01, rtol=0)


def test_batch_size_scaling_divides_covariance():
    noise = GaussianNoise(torch.tensor([2.0, 4.0], dtype=F64)).with_batch_size(4)
    torch.testing.assert_close(noise.variance, torch.tensor([1.0, 4.0], dtype=F64))
    full = GaussianNoise(cov=torch.eye(2, dtype=F64) * 8).with_batch_size(2)
    torch.testing.assert_close(full.chol @ full.chol.T, torch.eye(2, dtype=F64) * 4)
    t = StudentTNoise(5, 2.0).with_batch_size(16)
    assert float(t.scale) == pytest.approx(0.5)


@pytest.mark.parametrize("nu", [0.5, 1.0, 1.5, 2.0, 3.0, 7.5, 40.0])
def test_student_t_sign_mean_matches_scipy(nu):
    y = torch.tensor([-30, -2.5, -1, -0.2, 0, 1e-5, 0.3, 0.8, 1, 3, 200], dtype=F64)
    ref = torch.tensor(2 * scipy.stats.t.cdf(y.numpy(), nu) - 1, dtype=F64)
    torch.testing.assert_close(student_t_sign_mean(y, nu), ref, atol=1e-7, rtol=0)


@pytest.mark.parametrize("nu", [0.7, 1.0, 3.0, 5.5])
def test_student_t_samples_follow_the_t_law(nu):
    z = StudentTNoise(nu, 2.0).sample(40_000, 1, generator=gen(int(nu * 10)))
    assert scipy.stats.kstest(z.flatten().numpy() / 2.0, "t", args=(nu,)).pvalue > 1e-3


def test_samples_are_seeded():
    n = StudentTNoise(1.5, 1.0)
    torch.testing.assert_close(n.sample(10, 3, generator=gen(3)), n.sample(10, 3, generator=gen(3)))


def test_gaussian_sign_mean_is_erf():
    g = torch.tensor([[0.3, -2.0]], dtype=F64)
    out = GaussianNoise(torch.tensor([1.0, 0.5], dtype=F64)).sign_mean(g)
    ref = torch.erf(g / (torch.tensor([1.0, 0.5], dtype=F64) * math.sqrt(2)))
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: GaussianNoise(-1.0), ValueError, r"std must be finite and >= 0, got -1"),
        (lambda: GaussianNoise(torch.tensor([1.0, -0.1])), ValueError, r"std must be .*got -0.1"),
        (lambda: GaussianNoise(cov=torch.tensor([[1.0, 0.0], [0.0, -2.0]])), ValueError,
         r"cov must be positive semi-definite, got eigenvalue -2"),
        (lambda: GaussianNoise(cov=torch.tensor([[1.0, 0.5], [0.0, 1.0]])), ValueError,
         r"cov must be finite and symmetric"),
        (lambda: GaussianNoise(), ValueError, r"exactly one of std and cov"),
        (lambda: StudentTNoise(0), ValueError, r"nu must be > 0, got 0"),
        (lambda: StudentTNoise(-2.0), ValueError, r"nu must be > 0, got -2"),
        (lambda: StudentTNoise(3, scale=-1.0), ValueError, r"scale must be finite and >= 0"),
        (lambda: GaussianNoise(1.0).with_batch_size(0), ValueError,
         r"batch_size must be >= 1, got 0"),
        (lambda: StudentTNoise(1).with_batch_size(4), ValueError, r"nu must be > 2 for batch-size"),
        (lambda: GaussianNoise(torch.ones(3)).sample(5, 4), ValueError,
         r"noise dimension must match the parameter dimension 4, got 3"),
    ],
)
def test_bad_input_raises_clear_errors(build, error, match):
    with pytest.raises(error, match=match):
        build()
