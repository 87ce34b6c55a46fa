"""The ``eos`` experiment: its pieces (loss, quadratic regression model, statistics, phases)
and ``flatlab run eos --quick`` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flatlab.experiments._eos_lab import (
    Phase,
    QuadraticRegression,
    first_crossing,
    half_mse,
    mse_onehot,
    standardize,
    value_at,
    window_stats,
)


@pytest.fixture
def one_thread():
    # tiny models: one thread avoids oversubscription on a shared machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_mse_onehot_is_half_squared_error_summed_over_classes_averaged_over_examples():
    out = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    # example 1: 0; example 2: (0-1)^2 + 2^2 = 5 -> ½·5; mean over 2 examples = 1.25
    assert mse_onehot(out, y).item() == pytest.approx(1.25)
    half = half_mse(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]))
    assert half.item() == pytest.approx(1.25)


def test_standardize_centers_and_scales_and_keeps_constant_features_finite():
    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    z = standardize(x)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-6)
    assert torch.allclose(z.std(0)[[0, 2]], torch.ones(2))
    assert torch.equal(z[:, 1], torch.zeros(3))


def test_quadratic_regression_model_hessian_matches_closed_form():
    torch.manual_seed(0)
    model = QuadraticRegression(6, 5, seed=3)
    with torch.no_grad():
        model.theta.normal_()
    idx, y = model.data()
    theta = model.theta.detach()
    # closed form: H = (1/D) sum_i [g_i g_i^T + z_i Q_i], g_i = J_i + Q_i theta
    g = model.jac + torch.einsum("ipq,q->ip", model.quad, theta)  # (D, P)
    z = model(idx).detach() - y
    h_closed = (g.T @ g + torch.einsum("i,ipq->pq", z, model.quad)) / 6

    def loss_of(t):
        lin = model.jac @ t
        return half_mse(lin + 0.5 * torch.einsum("ipq,p,q->i", model.quad, t, t), y)

    h_auto = torch.func.hessian(loss_of)(theta)
    assert torch.allclose(h_auto, h_closed, atol=1e-12)
    assert torch.allclose(model.quad, model.quad.transpose(1, 2))
    assert model.theta.abs().sum() > 0 and QuadraticRegression(6, 5).theta.abs().sum() == 0


def test_first_crossing_and_window_stats():
    # (step, lambda, threshold, loss): crosses at step 30, then plateaus at 1.02 x threshold
    pts = [(s, min(0.5 + 0.02 * s, 1.3 if s == 40 else 1.02) * 10, 10.0, 1.0 / (1 + s))
           for s in range(0, 200, 10)]
    step, loss = first_crossing(pts)
    assert step == 30 and loss == pytest.approx(1 / 31)
    assert first_crossing(pts, 0.95)[0] == 30
    assert first_crossing(pts, 2.0) is None
    st = window_stats(pts, 50)
    assert st["n"] == 15 and st["ratio"] == pytest.approx(1.02) and st["thr"] == 10.0
    assert window_stats(pts, 10**6)["n"] == 0 and math.isnan(window_stats(pts, 10**6)["lam"])
    assert value_at(pts, 5) == pytest.approx(6.0)  # halfway between 5 and 7
    assert math.isnan(value_at(pts, 10**6))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"method": "adam", "lr": 0.1, "steps": 1}, "method must be one of"),
     ({"method": "gd", "lr": 0.0, "steps": 1}, "lr must be > 0"),
     ({"method": "gd", "lr": 0.1, "steps": 0}, "steps must be >= 1"),
     ({"method": "gd", "lr": 0.1, "steps": 5, "rho": 0.1}, "rho must be 0 for a gd phase"),
     ({"method": "sam", "lr": 0.1, "steps": 5}, "rho must be > 0 for a sam phase")],
)
def test_phase_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Phase(**kwargs)


def test_phase_labels_are_unique_per_setting():
    labels = {Phase("gd", 0.2, 100).label, Phase("sam", 0.2, 100, 0.02).label,
              Phase("usam", 0.2, 100, 0.02).label, Phase("usam", 0.2, 100, 0.02, 10).label,
              Phase("sam", 0.2, 100, 0.02, batch_size=10).label}
    assert len(labels) == 5


def test_eos_quick_end_to_end(tmp_path, one_thread):
    from flatlab.experiments import launch

    run = launch("eos", quick=True, out=tmp_path)
    assert run.done
    titles = [s["title"] for s in run.sections()]
    for part in ("T1", "T2", "T3-T5", "T6", "T7", "MNIST-1D", "Minibatch"):
        assert any(t.startswith(part) for t in titles), part
    records = run.metrics()
    eig = [r for r in records if "lambda_max" in r]
    assert eig and all(r["edge_gd"] == pytest.approx(2 / r["lr"]) for r in eig)
    assert any("edge_usam" in r for r in eig)
    sam = [r for r in eig if "edge_sam" in r]
    assert sam and all(r["grad_norm"] > 0 for r in sam)
    # shared prefixes ran once: the GD prefix of the late-switch runs is one tag
    tags = {r["tag"] for r in records}
    assert sum(t.startswith("digits.gd_lr0.2_30") and "+" not in t for t in tags) == 1
    for name in ("digits_lambda", "digits_lambda_gf_time", "switching_lambda", "qrm_lambda"):
        assert (run.plots_dir / f"{name}.png").stat().st_size > 0
    results = run.results()
    assert results["T1.all_as_predicted"] in (True, False)
    assert "T7.late.steps_to_edge" in results
    assert json.loads((run.path / "config.json").read_text())["config"]["quick"] is True
    assert "Lanczos" in (run.path / "report.md").read_text()
