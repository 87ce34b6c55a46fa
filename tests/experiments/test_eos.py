"""The ``eos`` experiment: its pieces (loss, quadratic regression model, statistics, phases)
and ``flatlab run eos --quick`` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flatlab.experiments._eos_lab import (
    Phase,
    Point,
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
    pts = [Point(s, min(0.5 + 0.02 * s, 1.3 if s == 40 else 1.02) * 10, 10.0, 1.0 / (1 + s))
           for s in range(0, 200, 10)]
    hit = first_crossing(pts)
    step, loss = hit.step, hit.loss
    assert step == 30 and loss == pytest.approx(1 / 31)
    assert first_crossing(pts, 0.95).step == 30
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
    for part in ("T1", "T2", "T3-T5", "T6", "T7", "MNIST-1D", "Minibatch", "T2 diagnosis",
                 "T7 diagnosis"):
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
    # the gated network study: one verdict per claim and network, from report.stats
    verdicts = next(s for s in run.sections() if s["title"].endswith("verdicts"))["table"]
    assert len(verdicts) == 2 * 5 and all(v["n"] == 2 for v in verdicts)
    assert {"net.mlp.on_edge", "net.cnn.on_edge", "T7seeds.diverged"} <= set(results)
    assert "qrm_sweep.eta2_rho0.exact" in results
    assert json.loads((run.path / "config.json").read_text())["config"]["quick"] is True
    assert "Lanczos" in (run.path / "report.md").read_text()


@pytest.mark.slow
def test_eos_full_reproduces_the_gated_targets(tmp_path, one_thread):
    """The full run (about 2 h wall on a loaded 2-core machine): the targets that
    docs/results/eos.md reports as reproduced. Misses reported there are not asserted."""
    from flatlab.experiments import launch

    res = launch("eos", out=tmp_path).results()
    assert res["T1.all_as_predicted"] is True
    assert 0.99 <= res["T2.GD η=2"] <= 1.01 and res["T2.GD η=1 (control)"] < 0.99
    assert 0.97 <= res["T2.USAM η=1 ρ=1"] <= 1.03
    for key in ("digits.GD η=0.2.ratio", "digits.GD η=0.15.ratio"):
        assert 0.97 <= res[key] <= 1.08, key
    for key in ("digits.USAM ρ=0.05.ratio", "digits.USAM ρ=0.2.ratio",
                "digits.SAM ρ=0.005.ratio", "digits.SAM ρ=0.02.ratio"):
        assert 0.95 <= res[key] <= 1.10, key
    assert res["digits.USAM ρ=0.05.vs_gd"] < 0.9 and res["digits.USAM ρ=0.2.vs_gd"] < 0.9
    assert res["T3.gf_time_gap"] < 0.05
    for key in ("digits.T6.USAM ρ=0.2.loss_ratio", "digits.T6.SAM ρ=0.005.loss_ratio",
                "digits.T6.SAM ρ=0.02.loss_ratio"):
        assert res[key] >= 3, key
    assert res["T7.early.steps_back"] <= 800 and res["T7.late.steps_to_edge"] <= 600
    for net in ("mlp", "cnn"):  # the gated minibatch study (5 paired seeds)
        assert res[f"net.{net}.on_edge"] is True, net
        assert res[f"net.{net}: λ_max(SGD+SAM) − λ_max(SGD) < 0"] is True, net


def test_curvature_monitor_edge_follows_a_rho_warmup(one_thread):
    # the monitor evaluates a rho schedule at the step the optimizer takes next
    from flatlab.models import MLP
    from flatlab.optim.schedules import LinearWarmup
    from flatlab.optim.stability import edge_of_stability
    from flatlab.train import CurvatureMonitor, build_optimizer, fit

    torch.manual_seed(0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    model = MLP(4, 3, width=8, depth=1, activation="tanh").double()
    rho = LinearWarmup(0.2, warmup_steps=10)
    opt = build_optimizer("usam", model.parameters(), lr=0.1, rho=rho)
    mon = CurvatureMonitor(every=5, method="usam", rho=rho, tol=1e-3)
    hist = fit(model, opt, (x, y), steps=10, loss_fn=mse_onehot, callbacks=[mon],
               progress=False).history
    by_step = {r["step"]: r for r in hist if "lambda_max" in r}
    assert "edge_usam" not in by_step[0]  # rho(0) = 0: no USAM line yet
    assert by_step[5]["edge_usam"] == pytest.approx(edge_of_stability("usam", 0.1, 0.1))
    assert by_step[10]["edge_usam"] == pytest.approx(edge_of_stability("usam", 0.1, 0.2))


def test_minibatch_grad_norm_is_the_full_norm_for_full_batches_and_checks_input(one_thread):
    from flatlab.experiments._eos_net import MinibatchGradNorm
    from flatlab.models import MLP
    from flatlab.optim.stability import edge_of_stability
    from flatlab.train import FitState, build_optimizer

    torch.manual_seed(0)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    model = MLP(4, 3, width=6, depth=1, activation="tanh").double()
    opt = build_optimizer("sgd", model.parameters(), lr=0.1)
    state = FitState(model, opt, mse_onehot, [(x, y)], steps=1)
    full = torch.autograd.grad(mse_onehot(model(x), y), list(model.parameters()))
    full_norm = float(torch.sqrt(sum(g.pow(2).sum() for g in full)))
    out = MinibatchGradNorm((x, y), 12, rho=0.05, every=1, n_batches=3).on_step(state)
    assert out["batch_grad_norm"] == pytest.approx(full_norm, rel=1e-12)
    assert out["edge_sam_batch"] == pytest.approx(
        edge_of_stability("sam", 0.1, 0.05, grad_norm=full_norm))
    small = MinibatchGradNorm((x, y), 2, rho=0.05, every=1, n_batches=50).on_step(state)
    assert small["batch_grad_norm"] > full_norm  # noise inflates the minibatch norm
    assert all(p.grad is None for p in model.parameters())
    for kwargs, match in (({"batch_size": 0}, "batch_size"), ({"rho": 0.0}, "rho"),
                          ({"n_batches": 0}, "n_batches")):
        args = {"batch_size": 4, "rho": 0.05, "n_batches": 2, **kwargs}
        with pytest.raises(ValueError, match=match):
            MinibatchGradNorm((x, y), every=1, **args)


def test_edge_gates_pass_only_inside_the_band():
    from flatlab.experiments._eos_net import edge_gates

    assert all(v.passed for v in edge_gates([1.01, 1.03, 0.99, 1.02, 1.0], "x"))
    above = edge_gates([1.12, 1.15, 1.13], "x")
    assert not above[0].passed and above[1].passed
    wide = edge_gates([0.7, 1.3, 1.0], "x")  # mean inside, interval not
    assert not wide[0].passed and not wide[1].passed


def test_qrm_lambda_max_is_the_exact_top_hessian_eigenvalue():
    from flatlab.experiments._eos_diag import qrm_lambda_max

    model = QuadraticRegression(7, 5, seed=1)
    with torch.no_grad():
        model.theta.normal_(generator=torch.Generator().manual_seed(2))
    idx, y = model.data()
    theta = model.theta.detach().clone()

    def loss_of(t):
        return half_mse(model.jac @ t + 0.5 * torch.einsum("ipq,p,q->i", model.quad, t, t), y)

    top = torch.linalg.eigvalsh(torch.func.hessian(loss_of)(theta))[-1]
    assert qrm_lambda_max(model) == pytest.approx(float(top), rel=1e-12)


def test_qrm_sweep_refuses_rho_lambda_star_above_one():
    from types import SimpleNamespace

    from flatlab.experiments._eos_diag import qrm_sweep

    cfg = SimpleNamespace(dtype="float64", qrm_sweep_steps=10, qrm_steps=10, qrm_eig_every=5,
                          qrm_seeds=1, seed=0, qrm_size=4, eig_tol=1e-3, qrm_sweep=[(2.0, 5.0)])
    with pytest.raises(ValueError, match="rho \\* lambda\\* <= 1"):
        qrm_sweep(cfg, None)


def test_eos_config_rejects_unknown_parts_and_networks():
    from pydantic import ValidationError

    from flatlab.experiments.eos import Config

    with pytest.raises(ValidationError, match="parts must be among"):
        Config(parts=["networks", "nope"])
    with pytest.raises(ValidationError, match="net_models"):
        Config(net_models=["resnet"])
    assert Config(parts=["qrm"]).parts == ["qrm"]
