"""Callbacks against closed forms: λ_max of a least-squares Hessian, edges, accuracy, sparsity."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from flatlab.optim import LinearWarmup
from flatlab.train import (
    ActivationSparsity,
    CurvatureMonitor,
    Evaluate,
    Sharpness,
    build_optimizer,
    evaluate,
    fit,
)


def _has(module: str, attr: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def _least_squares(n: int = 50, d: int = 4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    return model, x, y


@pytest.mark.skipif(not _has("flatlab.curvature", "top_eigenvalues"),
                    reason="flatlab.curvature.top_eigenvalues not available yet")
def test_curvature_monitor_matches_dense_hessian_and_edges() -> None:
    model, x, y = _least_squares()
    # L(w) = mean (x.w - y)^2  ->  H = 2/n X^T X, constant in w
    lam = torch.linalg.eigvalsh(2 * x.T @ x / x.shape[0]).max().item()
    opt = build_optimizer("sgd", model.parameters(), lr=0.05)
    mon = CurvatureMonitor(every=2, method="usam", rho=0.1, tol=1e-8)
    res = fit(model, opt, (x, y), steps=4, loss_fn=F.mse_loss, callbacks=[mon], progress=False)
    measured = [r for r in res.history if "lambda_max" in r]
    assert [r["step"] for r in measured] == [0, 2, 4]
    for r in measured:
        assert r["lambda_max"] == pytest.approx(lam, rel=1e-6)
        assert r["edge_gd"] == pytest.approx(2 / 0.05)
        assert r["edge_usam"] == pytest.approx(4 / (0.05 * (1 + (1 + 8 * 0.1 / 0.05) ** 0.5)))
    assert mon.state_dict()["init"] is not None  # warm start carried between calls


@pytest.mark.skipif(not _has("flatlab.curvature", "top_eigenvalues"),
                    reason="flatlab.curvature.top_eigenvalues not available yet")
def test_curvature_monitor_sam_edge_uses_the_full_batch_gradient_norm() -> None:
    model, x, y = _least_squares()
    mon = CurvatureMonitor(every=1, method="sam", rho=0.1, tol=1e-8)
    res = fit(model, build_optimizer("sgd", model.parameters(), lr=0.05), (x, y), steps=1,
              loss_fn=F.mse_loss, callbacks=[mon], progress=False)
    rec = res.history[-1]
    w = model.weight.detach().flatten()
    grad = 2 * x.T @ (x @ w - y.flatten()) / x.shape[0]
    assert rec["grad_norm"] == pytest.approx(grad.norm().item(), rel=1e-9)
    lam_star = rec["edge_sam"]  # solves lr * lam (1 + rho lam / |g|) = 2
    assert 0.05 * lam_star * (1 + 0.1 * lam_star / rec["grad_norm"]) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "name, kwargs, edge",
    [
        ("sgd", {}, None),
        ("sam", {"rho": 0.1}, "edge_sam"),
        ("usam", {"rho": 0.1}, "edge_usam"),
        ("asam", {"rho": 0.1}, None),
        ("sam", {"rho": LinearWarmup(0.2, warmup_steps=4)}, "edge_sam"),
    ],
    ids=["sgd", "sam", "usam", "asam", "sam-rho-warmup"],
)
def test_curvature_monitor_reads_edge_and_radius_from_the_optimizer(name, kwargs, edge) -> None:
    """method="auto" and rho=None: the edge the optimizer has, at the radius its next step
    uses, equal to passing them by hand."""
    from flatlab.optim.stability import edge_of_stability

    model, x, y = _least_squares()
    opt = build_optimizer(name, model.parameters(), lr=0.05, **kwargs)
    mon = CurvatureMonitor(every=1, tol=1e-8)
    res = fit(model, opt, (x, y), steps=3, loss_fn=F.mse_loss, callbacks=[mon], progress=False)
    recs = [r for r in res.history if "lambda_max" in r]
    others = {"edge_sam", "edge_usam"} - {edge}
    for r in recs:
        assert not others & set(r)
        if edge is None:
            continue
        rho = kwargs["rho"]
        rho = rho(r["step"], 0.05) if callable(rho) else rho
        if rho == 0:
            assert edge not in r  # the warm-up starts at rho = 0: no SAM edge yet
            continue
        want = (edge_of_stability("sam", 0.05, rho, grad_norm=r["grad_norm"])
                if edge == "edge_sam" else edge_of_stability("usam", 0.05, rho))
        assert r[edge] == pytest.approx(want)
    assert len(recs) == 4


def test_evaluate_accuracy_and_weighted_loss_over_batches() -> None:
    model = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 0, 0, 1])
    whole = evaluate(model, F.cross_entropy, (x, y))
    split = evaluate(model, F.cross_entropy, [(x[:1], y[:1]), (x[1:], y[1:])])
    assert whole["acc"] == 0.75 and split["acc"] == 0.75
    assert split["loss"] == pytest.approx(whole["loss"])
    reg = evaluate(model, F.mse_loss, (x, x))
    assert set(reg) == {"loss"}  # no accuracy for regression targets
    with pytest.raises(ValueError, match="at least one dataset"):
        Evaluate({})


def test_activation_sparsity_logs_mean_and_layers() -> None:
    pytest.importorskip("flatlab.sparsity")
    if not _has("flatlab.sparsity", "activation_sparsity"):
        pytest.skip("flatlab.sparsity.activation_sparsity not available yet")
    from flatlab.sparsity import activation_sparsity

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    res = fit(model, torch.optim.SGD(model.parameters(), lr=0.1), (x, y), steps=2,
              callbacks=[ActivationSparsity(every=2)], progress=False)
    rec = res.history[-1]
    direct = activation_sparsity(model, (x, y))
    assert rec["act_sparsity"] == pytest.approx(direct.mean)
    assert rec["act_sparsity/1"] == pytest.approx(direct.per_layer["1"])
    assert 0.0 < rec["act_sparsity"] < 1.0


@pytest.mark.skipif(not _has("flatlab.curvature", "worst_case_sharpness"),
                    reason="flatlab.curvature.worst_case_sharpness not available yet")
@pytest.mark.parametrize("measure", ["worst_case", "average", "first_order", "trace"])
def test_sharpness_callback_logs_the_curvature_measure(measure: str) -> None:
    import flatlab.curvature as curvature

    model, x, y = _least_squares()
    kw = {"samples": 4} if measure == "average" else {"probes": 6} if measure == "trace" else {}
    res = fit(model, build_optimizer("sgd", model.parameters(), lr=0.01), (x, y), steps=1,
              loss_fn=F.mse_loss, callbacks=[Sharpness(every=1, measure=measure, rho=0.01, **kw)],
              progress=False)
    fn = {"worst_case": curvature.worst_case_sharpness,
          "average": curvature.average_sharpness,
          "first_order": curvature.first_order_flatness}.get(measure)
    direct = (fn(model, F.mse_loss, [(x, y)], rho=0.01, **kw) if fn is not None
              else curvature.hessian_trace(model, F.mse_loss, [(x, y)], **kw))
    assert res.history[-1][f"sharpness_{measure}"] == pytest.approx(float(direct.value),
                                                                    rel=1e-6)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: CurvatureMonitor(every=0), "every must be >= 1, got 0"),
        (lambda: CurvatureMonitor(method="adam"),
         "method must be one of 'auto', 'gd', 'usam', 'sam'"),
        (lambda: CurvatureMonitor(rho=-1.0), "rho must be >= 0, got -1.0"),
        (lambda: Sharpness(measure="max"), "measure must be one of"),
        (lambda: ActivationSparsity(every=-2), "every must be >= 1, got -2"),
    ],
)
def test_bad_callback_arguments(factory, match) -> None:
    with pytest.raises(ValueError, match=match):
        factory()
