"""Edge-of-stability thresholds: closed forms, errors, and target T1 on quadratics.

The simulations drive flatlab's own optimizers (``torch.optim.SGD`` for GD, ``flatlab.optim.SAM``
with ``normalize=False`` for USAM and ``normalize=True`` for SAM) over ``L = ½ θᵀ H θ`` with a
diagonal H in float64, through the ``step(closure)`` protocol, so these tests check the optimizers
and the formulas together.
"""

from __future__ import annotations

import math

import pytest
import torch

from flatlab.optim.stability import edge_of_stability, sam_bounce_amplitude, stability_product


# ---------------------------------------------------------------- simulation helpers
def _optimizer(method: str, params, lr: float, rho: float):
    if method == "gd":
        return torch.optim.SGD(params, lr=lr)
    from flatlab.optim import SAM

    return SAM(params, torch.optim.SGD, rho=rho, normalize=(method == "sam"), lr=lr)


def _run(method, lr, rho, eigs, x0, steps, linear=None, blowup=1e8):
    """Iterate ``method`` on ``L = ½ Σ λ_i x_i² (+ a·y)``; return the final iterate (float64).

    Stops early (returning the current iterate) once ``|x|`` exceeds ``blowup``.
    """
    h = torch.tensor(eigs, dtype=torch.float64)
    x = torch.nn.Parameter(torch.tensor(x0, dtype=torch.float64))
    params = [x]
    y = None
    if linear is not None:  # a "ramp" direction holding ||g|| >= linear
        y = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        params.append(y)
    opt = _optimizer(method, params, lr, rho)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (h * x * x).sum()
        if y is not None:
            loss = loss + linear * y
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
        if not torch.isfinite(x).all() or x.detach().abs().max() > blowup:
            break
    return x.detach().clone()


def _spectrum(top: float, d: int = 20) -> list[float]:
    """d eigenvalues: ``top`` and d-1 values spread over [0.1, 0.9]·top."""
    return [top] + [top * (0.1 + 0.8 * i / (d - 2)) for i in range(d - 1)]


def _converges(method, lr, rho, top, steps=800):
    # the top component contracts by |1 - p| <= 0.98 per step: 0.98^800 < 1e-7
    x = _run(method, lr, rho, _spectrum(top), [1.0] * 20, steps, blowup=1e3)
    return bool(torch.isfinite(x).all() and x.norm() < 1e-4)


def _diverges(method, lr, rho, top, steps=800):
    # the top component grows by |1 - p| >= 1.02 per step: 1.02^800 > 1e6
    x = _run(method, lr, rho, _spectrum(top), [1.0] * 20, steps, blowup=1e3)
    return bool(not torch.isfinite(x).all() or x.norm() > 1e3)


# ---------------------------------------------------------------- closed forms
def test_gd_edge_is_two_over_lr():
    assert edge_of_stability("gd", 0.2) == pytest.approx(10.0, rel=1e-15)
    assert edge_of_stability("gd", lr=0.01) == pytest.approx(200.0, rel=1e-15)


@pytest.mark.parametrize(("lr", "rho", "expected"), [(0.1, 0.05, 12.3607), (0.01, 0.01, 100.0),
                                                      (0.05, 0.5, 8.0)])
def test_usam_edge_matches_note_values(lr, rho, expected):
    assert edge_of_stability("usam", lr, rho) == pytest.approx(expected, rel=1e-5)
    # it is the positive root of lr*l*(1 + rho*l) = 2, below 2/lr
    lam = edge_of_stability("usam", lr, rho)
    assert lr * lam * (1 + rho * lam) == pytest.approx(2.0, rel=1e-13)
    assert lam < 2 / lr


def test_usam_edge_tends_to_gd_and_is_stable_for_tiny_rho():
    assert edge_of_stability("usam", 0.1, 0.0) == 20.0
    assert edge_of_stability("usam", 0.1, 1e-14) == pytest.approx(20.0, rel=1e-12)
    lam = edge_of_stability("usam", 0.1, 1e-14)
    assert (math.sqrt(1 + 8e-14 / 0.1) - 1) / 2e-14 != pytest.approx(lam, rel=1e-6)  # naive form


def test_sam_edge_is_usam_with_rho_over_grad_norm():
    for g in (0.03, 0.3, 3.0):
        assert edge_of_stability("sam", 0.2, 0.02, grad_norm=g) == pytest.approx(
            edge_of_stability("usam", 0.2, 0.02 / g), rel=1e-14
        )
    # note's formula (|g|/(2 rho)) (sqrt(1 + 8 rho/(lr |g|)) - 1)
    g, lr, rho = 0.1, 0.2, 0.02
    direct = g / (2 * rho) * (math.sqrt(1 + 8 * rho / (lr * g)) - 1)
    assert edge_of_stability("sam", lr, rho, grad_norm=g) == pytest.approx(direct, rel=1e-13)
    assert edge_of_stability("sam", lr, rho, grad_norm=torch.tensor(g)) == pytest.approx(direct)
    assert edge_of_stability("sam", lr, rho, grad_norm=0.0) == 0.0  # limit g -> 0
    assert edge_of_stability("sam", lr, 0.0, grad_norm=0.0) == 2 / lr


def test_stability_product_is_two_at_the_edge():
    for method, kw in [("gd", {}), ("usam", {"rho": 0.3}), ("sam", {"rho": 0.1, "grad_norm": 0.5})]:
        lam = edge_of_stability(method, 0.05, **kw)
        assert stability_product(method, 0.05, lam, **kw) == pytest.approx(2.0, rel=1e-13)
        assert stability_product(method, 0.05, 1.01 * lam, **kw) > 2.0


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: edge_of_stability("sam", 0.1, 0.05), ValueError, "grad_norm must be given"),
        (lambda: edge_of_stability("gd", 0.0), ValueError, "lr must be > 0, got 0.0"),
        (lambda: edge_of_stability("gd", -0.1), ValueError, "lr must be > 0, got -0.1"),
        (lambda: edge_of_stability("usam", 0.1, -0.5), ValueError, "rho must be >= 0, got -0.5"),
        (lambda: edge_of_stability("adam", 0.1), ValueError, "method must be one of 'gd'"),
        (lambda: edge_of_stability("gd", 0.1, 0.05), ValueError, "rho must be 0 for method 'gd'"),
        (lambda: edge_of_stability("usam", 0.1, 0.05, 1.0), ValueError, "grad_norm must be None"),
        (lambda: edge_of_stability("sam", 0.1, 0.05, -1.0), ValueError, "grad_norm must be >= 0"),
        (lambda: edge_of_stability("gd", "0.1"), TypeError, "lr must be a real number"),
        (lambda: edge_of_stability("gd", float("nan")), ValueError, "lr must not be NaN"),
        (lambda: sam_bounce_amplitude(0.1, 20.5, 0.05), ValueError, "lr \\* sharpness must be < 2"),
        (lambda: stability_product("gd", 0.1, -1.0), ValueError, "sharpness must be >= 0"),
    ],
)
def test_bad_input_gives_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ---------------------------------------------------------------- T1: simulations
@pytest.mark.parametrize("lr", [0.1, 0.01])
def test_t1_gd_converges_at_1_98_and_diverges_at_2_02(lr):
    assert _converges("gd", lr, 0.0, 1.98 / lr)
    assert _diverges("gd", lr, 0.0, 2.02 / lr)


@pytest.mark.parametrize(("lr", "rho"), [(0.1, 0.05), (0.01, 0.01), (0.05, 0.5)])
def test_t1_usam_converges_at_0_99_and_diverges_at_1_01_of_edge(lr, rho):
    edge = edge_of_stability("usam", lr, rho)
    assert _converges("usam", lr, rho, 0.99 * edge)
    assert _diverges("usam", lr, rho, 1.01 * edge)
    # and the edge is genuinely below GD's: USAM diverges where GD is still stable
    assert _converges("gd", lr, 0.0, 1.01 * edge)


@pytest.mark.parametrize("lr_lam", [1.0, 1.8, 1.98])
def test_t1_sam_bounces_with_predicted_amplitude_and_edge(lr_lam):
    lr, rho = 0.1, 0.05
    top = lr_lam / lr
    eigs = _spectrum(top)
    x = _run("sam", lr, rho, eigs, [1.0] * 20, 1500)
    amplitude = sam_bounce_amplitude(lr, top, rho)
    assert x[0].abs().item() == pytest.approx(amplitude, rel=1e-3)
    assert x[1:].norm().item() < 1e-6 * amplitude  # the other components died out
    grad_norm = (torch.tensor(eigs, dtype=torch.float64) * x).norm().item()
    assert edge_of_stability("sam", lr, rho, grad_norm=grad_norm) == pytest.approx(top, rel=1e-3)
    # period 2: the sign alternates on the orbit
    x_next = _run("sam", lr, rho, eigs, x.tolist(), 1)
    assert x_next[0].item() == pytest.approx(-x[0].item(), rel=1e-6)


def test_t1_sam_diverges_above_two_over_lr():
    assert _diverges("sam", 0.1, 0.05, 20.2)


def _growth_onset(method, lr, rho, linear=None, steps=400, rel_tol=2e-3):
    """Brute-force edge: bisect for the smallest λ at which a tiny component grows 10-fold.

    Below the edge ``|x|`` shrinks monotonically; growth by 10x in ``steps`` needs a per-step
    factor ``> 10^(1/steps)``, so the onset found lies at most ~0.3% above the true edge.
    """

    def grows(lam):
        x = _run(method, lr, rho, [lam], [1e-8], steps, linear=linear, blowup=1e-7)
        return bool(not torch.isfinite(x).all() or x.abs().item() >= 1e-7)

    lo, hi = 0.2 / lr, 2.2 / lr  # a bracket valid for every case below (checked)
    assert grows(hi) and not grows(lo)
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if grows(mid) else (mid, hi)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize(
    ("method", "lr", "rho", "grad_norm"),
    [("gd", 0.1, 0.0, None), ("usam", 0.1, 0.05, None), ("usam", 0.05, 0.5, None),
     ("sam", 0.2, 0.02, 0.1), ("sam", 0.1, 0.05, 1.0)],
)
def test_edge_matches_brute_force_simulation_to_one_percent(method, lr, rho, grad_norm):
    # for SAM a linear "ramp" direction with slope a holds ||g|| = a while the top component is
    # tiny, so the onset of growth of that component is edge(a)
    onset = _growth_onset(method, lr, rho, linear=grad_norm)
    kw = {} if grad_norm is None else {"grad_norm": grad_norm}
    assert onset == pytest.approx(edge_of_stability(method, lr, rho, **kw), rel=0.01)
