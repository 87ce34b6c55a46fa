"""Hutchinson / Hutch++ trace (XTrace: test_xtrace.py) and SLQ density against exact values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.curvature import ggn_operator, hessian_operator, hessian_trace, spectral_density
from flatlab.curvature.density import _lanczos_quadrature
from flatlab.curvature.operator import DenseOperator

from .conftest import concat, dense_ggn, problem, spectrum_matrix

CE = nn.functional.cross_entropy


def _decaying_psd(n=800):
    # lambda_i = 1 / i^2: a few directions carry most of the trace, as in trained networks
    return spectrum_matrix(1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 2, seed=2)


def test_hutchpp_within_5_percent_with_30_probes():
    A = _decaying_psd()
    truth = float(torch.trace(A))
    errors_pp, errors_h = [], []
    for seed in range(20):
        pp = hessian_trace(A, probes=30, method="hutch++", seed=seed)
        h = hessian_trace(A, probes=30, method="hutchinson", seed=seed)
        assert pp.n_matvecs == 30 and h.n_matvecs == 30
        errors_pp.append(abs(pp.value - truth) / truth)
        errors_h.append(abs(h.value - truth) / truth)
    assert max(errors_pp) < 0.05
    rms = lambda e: (sum(x * x for x in e) / len(e)) ** 0.5  # noqa: E731
    assert rms(errors_pp) < rms(errors_h) / 3


def test_hutchpp_on_model_ggn():
    """PSD GGN of the ReLU MLP, through the model operator (batched products)."""
    model, data, _ = problem("relu")
    truth = float(torch.trace(dense_ggn(model, CE, concat(data))))
    op = ggn_operator(model, CE, data)
    errs = [hessian_trace(op, probes=30, method="hutch++", seed=s).value / truth - 1
            for s in range(6)]
    assert (sum(e * e for e in errs) / len(errs)) ** 0.5 < 0.05
    assert op.n_matvecs == 6 * 30


def test_hutchinson_stderr_covers_truth():
    H = problem("tanh")[2][:1000, :1000]  # the first layers' principal block
    truth = float(torch.trace(H))
    covered, values = 0, []
    for seed in range(50):
        r = hessian_trace(H, probes=30, method="hutchinson", seed=seed)
        covered += abs(r.value - truth) <= 2 * r.stderr
        values.append(r.value)
    assert covered >= 45
    # the spread matches the Rademacher variance 2 (||H||_F^2 - sum_i H_ii^2) / K
    predicted = (2 * (float((H * H).sum()) - float((H.diagonal() ** 2).sum())) / 30) ** 0.5
    observed = float(torch.tensor(values).std())
    assert abs(observed / predicted - 1) < 0.25


def test_trace_of_model_operator_matches_dense_estimator():
    model, data, H = problem("tanh")
    op = hessian_operator(model, CE, data)
    a = hessian_trace(op, probes=12, method="hutchinson", seed=3, block=5)
    b = hessian_trace(H, probes=12, method="hutchinson", seed=3)
    assert abs(a.value - b.value) < 1e-9
    assert op.n_matvecs == 12
    # the (model, loss_fn, data) positional form, as the training callbacks call it
    c = hessian_trace(model, CE, data, probes=12, method="hutchinson", seed=3)
    assert abs(c.value - a.value) < 1e-9


def test_trace_exact_when_budget_covers_dimension():
    A = spectrum_matrix(torch.linspace(-1, 3, 7))
    r = hessian_trace(A, probes=21)
    assert abs(r.value - float(torch.trace(A))) < 1e-10 and r.stderr == 0.0


def test_slq_weights_and_moments():
    n = 1000
    g = torch.Generator().manual_seed(0)
    lam = torch.cat([torch.rand(n - 5, generator=g, dtype=torch.float64) * 1.5 + 0.5,
                     torch.tensor([8.0, 6.0, 5.0, -1.0, -2.0], dtype=torch.float64)])
    A = spectrum_matrix(lam, seed=1)
    d = spectral_density(A, steps=30, runs=10)
    assert abs(float(d.weights.sum()) - 1) < 1e-12
    assert d.nodes.shape == (10, 30) and d.n_matvecs == 300
    assert abs(d.moment(1) / (float(lam.sum()) / n) - 1) < 0.02
    assert abs(d.moment(2) / (float((lam**2).sum()) / n) - 1) < 0.02
    # the smoothed density integrates to ~1 and is nonnegative
    area = torch.trapezoid(d.density, d.grid)
    assert abs(float(area) - 1) < 1e-3 and bool((d.density >= 0).all())


def test_slq_quadrature_exact_for_low_degree_polynomials():
    """Gauss quadrature from m steps reproduces v^T A^p v for p < 2m, whatever the probe."""
    _, _, H = problem("relu")
    v = torch.randn(H.shape[0], dtype=torch.float64)
    theta, tau, used = _lanczos_quadrature(DenseOperator(H), v, 6)
    u = v / v.norm()
    Ap_u = u.clone()
    for p in range(1, 12):
        Ap_u = H @ Ap_u
        exact = float(u @ Ap_u)
        assert abs(float((tau * theta**p).sum()) - exact) <= 1e-9 * abs(exact) + 1e-14, p
    assert used == 6


def test_slq_on_model_and_errors():
    model, data, H = problem("tanh")
    d = spectral_density(model, CE, data, steps=10)
    truth = torch.linalg.eigvalsh(H)
    # extreme Ritz values lie inside the spectrum and approach its ends
    assert truth[0] - 1e-9 <= d.nodes.min() and d.nodes.max() <= truth[-1] + 1e-9
    assert float(d.nodes.max()) > 0.9 * float(truth[-1])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        spectral_density(H, steps=0)
    with pytest.raises(ValueError, match="probes must be >= 3 for hutch\\+\\+"):
        hessian_trace(H, probes=2, method="hutch++")
    with pytest.raises(ValueError, match="probes must be >= 4 for xtrace"):
        hessian_trace(H, probes=3)
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_trace(H, method="xtrace++")
