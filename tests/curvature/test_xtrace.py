"""XTrace and XNysTrace: the fast formulas against the leave-one-out definition, accuracy
against dense traces, and error estimates that cover the true error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.curvature import ggn_operator, hessian_operator, hessian_trace
from flatlab.curvature.trace import xnystrace_estimates, xtrace_estimates

from .conftest import concat, dense_ggn, problem, spectrum_matrix

CE = nn.functional.cross_entropy


def _probes(n, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    om = torch.randn(n, s, generator=g, dtype=torch.float64)
    return om * (n**0.5 / om.norm(dim=0))


def _complement(w, basis):
    q, _ = torch.linalg.qr(basis)
    return w - q @ (q.T @ w)


def test_xtrace_estimates_equal_leave_one_out_definition():
    """t_i = tr(Q_i^T A Q_i) + (n-s+1) x^T A x / x^T x, Q_i = orth(Y_-i), x = (I-Q_iQ_i^T) w_i."""
    n, s = 60, 7
    A = spectrum_matrix(torch.linspace(-2, 3, n), seed=4)
    om = _probes(n, s)
    Y = A @ om
    Q, R = torch.linalg.qr(Y)
    fast = xtrace_estimates(om, Y, Q, R, A @ Q)
    for i in range(s):
        rest = torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1)
        Qi, _ = torch.linalg.qr(rest)
        x = _complement(om[:, i], rest)
        naive = torch.trace(Qi.T @ A @ Qi) + (n - s + 1) * (x @ A @ x) / (x @ x)
        assert abs(float(fast[i] - naive)) < 1e-10


def test_xnystrace_estimates_equal_leave_one_out_definition():
    """t_i = tr(A<Om_-i>) + (n-s+1) x^T (A - A<Om_-i>) x / x^T x, x = (I - P_{Om_-i}) w_i."""
    n, s = 60, 7
    A = spectrum_matrix(1.0 / torch.arange(1, n + 1, dtype=torch.float64), seed=5)
    om = _probes(n, s, seed=1)
    fast = xnystrace_estimates(om, A @ om)
    for i in range(s):
        Oi = torch.cat([om[:, :i], om[:, i + 1 :]], dim=1)
        Yi = A @ Oi
        nys = Yi @ torch.linalg.solve(Oi.T @ Yi, Yi.T)
        x = _complement(om[:, i], Oi)
        naive = torch.trace(nys) + (n - s + 1) * (x @ (A - nys) @ x) / (x @ x)
        assert abs(float(fast[i] - naive)) < 1e-8


def _coverage(A, method, probes, seeds=50):
    truth = float(torch.trace(A))
    runs = [hessian_trace(A, probes=probes, method=method, seed=s) for s in range(seeds)]
    covered = sum(abs(r.value - truth) <= 2 * r.stderr for r in runs)
    errors = torch.tensor([r.value - truth for r in runs])
    return covered / seeds, errors, runs


@pytest.mark.parametrize("method", ["xtrace", "xnystrace"])
def test_psd_decaying_spectrum_accuracy_and_coverage(method):
    A = spectrum_matrix(1.0 / torch.arange(1, 801, dtype=torch.float64) ** 2, seed=2)
    truth = float(torch.trace(A))
    frac, errors, runs = _coverage(A, method, probes=30)
    assert all(r.n_matvecs == 30 and r.converged and r.method == method for r in runs)
    assert float(errors.abs().max()) / truth < 0.03  # Hutch++ needs 5% here (20 seeds)
    assert frac >= 0.9  # value +- 2 stderr covers the true trace
    assert abs(float(errors.mean())) < 4 * float(errors.std()) / len(errors) ** 0.5  # unbiased


def test_xtrace_indefinite_network_hessian_coverage():
    H = problem("tanh")[2][:600, :600]  # a principal block of an indefinite Hessian
    frac, errors, _ = _coverage(H, "xtrace", probes=40)
    assert frac >= 0.9
    assert abs(float(errors.mean())) < 4 * float(errors.std()) / len(errors) ** 0.5


def test_xtrace_beats_hutchinson_on_a_low_rank_plus_noise_spectrum():
    n = 500
    lam = torch.cat([torch.linspace(10, 2, 20), 0.01 * torch.randn(n - 20,
                     generator=torch.Generator().manual_seed(0))]).double()
    A = spectrum_matrix(lam, seed=3)
    truth = float(torch.trace(A))
    err = {m: torch.tensor([abs(hessian_trace(A, probes=60, method=m, seed=s).value - truth)
                            for s in range(10)]).median() for m in ("xtrace", "hutchinson")}
    assert err["xtrace"] < 0.1 * err["hutchinson"]


def test_xtrace_model_operator_matches_dense_and_default():
    model, data, H = problem("relu")
    op = hessian_operator(model, CE, data)
    a = hessian_trace(op, probes=20, seed=1)  # default method: xtrace
    b = hessian_trace(H, probes=20, seed=1, method="xtrace")
    assert a.method == "xtrace" and op.n_matvecs == 20
    assert abs(a.value - b.value) < 1e-8 * abs(b.value)


def test_xnystrace_on_model_ggn():
    model, data, _ = problem("relu")
    truth = float(torch.trace(dense_ggn(model, CE, concat(data))))
    op = ggn_operator(model, CE, data)
    errs = [hessian_trace(op, probes=30, method="xnystrace", seed=s).value / truth - 1
            for s in range(4)]
    assert max(abs(e) for e in errs) < 0.05


def test_xnystrace_refuses_an_indefinite_operator():
    A = spectrum_matrix(torch.linspace(-3, 1, 50), seed=1)
    with pytest.raises(ValueError, match="positive semi-definite"):
        hessian_trace(A, probes=10, method="xnystrace")


def test_exact_when_probes_cover_the_dimension():
    A = spectrum_matrix(torch.linspace(-1, 3, 9))
    for method in ("xtrace", "xnystrace"):
        r = hessian_trace(A, probes=9, method=method)
        assert r.method == "exact" and r.stderr == 0.0 and r.n_matvecs == 9
        assert abs(r.value - float(torch.trace(A))) < 1e-10
