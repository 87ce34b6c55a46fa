"""SAGM: the update kernel on float64 quadratics (exact), rho=alpha=0, pass counts, bad inputs,
pooled (default) and per-domain forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatlab.optim.sagm import sagm_gradient
from tests.optim.test_dgsam import _grad, _problem

S = 3


@pytest.mark.parametrize(("rho", "alpha"), [(0.3, 0.0), (0.3, 0.01), (0.05, 0.1)])
def test_combined_gradient_matches_hand_computation(rho, alpha):
    params, closures, mats, centers, theta, visited = _problem(seed=7)
    combined, losses = sagm_gradient(params, closures, rho=rho, alpha=alpha)
    g = np.mean([_grad(mats, centers, d, theta) for d in range(S)], axis=0)
    x = theta + (rho / (np.linalg.norm(g) + 1e-12) - alpha) * g
    g_p = np.mean([_grad(mats, centers, d, x) for d in range(S)], axis=0)
    np.testing.assert_allclose(torch.cat(combined).numpy(), (g + g_p) / 2, rtol=1e-12, atol=1e-12)
    # evaluation points: S at theta, then S at the perturbed point
    for _d, point in visited[:S]:
        np.testing.assert_allclose(point, theta, rtol=0, atol=0)
    for _d, point in visited[S:]:
        np.testing.assert_allclose(point, x, rtol=0, atol=1e-12)
    assert len(visited) == 2 * S and len(losses) == S
    assert np.array_equal(torch.cat([p.detach() for p in params]).numpy(), theta)


def test_rho_alpha_zero_is_the_mean_domain_gradient_exactly():
    params, closures, mats, centers, theta, _ = _problem(seed=8)
    combined, _ = sagm_gradient(params, closures, rho=0.0, alpha=0.0)
    plain, _ = sagm_gradient(params, closures, rho=0.0, alpha=0.0)
    erm = np.mean([_grad(mats, centers, d, theta) for d in range(S)], axis=0)
    np.testing.assert_allclose(torch.cat(combined).numpy(), erm, rtol=1e-12, atol=1e-12)
    for a, b in zip(combined, plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho": -1.0, "alpha": 0.0}, ValueError, "rho must be >= 0, got -1.0"),
        ({"rho": 0.1, "alpha": float("nan")}, ValueError, "alpha must not be NaN"),
        ({"rho": 0.1, "alpha": "x"}, TypeError, "alpha must be a real number"),
        ({"rho": 0.1, "alpha": 0.0, "eps": -1.0}, ValueError, "eps must be > 0"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    params, closures, *_ = _problem()
    with pytest.raises(error, match=match):
        sagm_gradient(params, closures, **kwargs)


def test_empty_closure_list_is_rejected():
    params, *_ = _problem()
    with pytest.raises(ValueError, match="empty list"):
        sagm_gradient(params, [], rho=0.1, alpha=0.0)


from flatlab.optim.sagm import SAGM  # noqa: E402


def test_class_step_is_base_step_with_combined_gradient():
    params, closures, mats, centers, theta, _ = _problem(seed=13)
    rho, alpha, lr = 0.2, 0.01, 0.1
    opt = SAGM(params, torch.optim.SGD, rho=rho, alpha=alpha, lr=lr, per_domain=True)
    loss = opt.step(closures)
    g = np.mean([_grad(mats, centers, d, theta) for d in range(S)], axis=0)
    x = theta + (rho / np.linalg.norm(g) - alpha) * g
    g_p = np.mean([_grad(mats, centers, d, x) for d in range(S)], axis=0)
    got = torch.cat([p.detach() for p in params]).numpy()
    np.testing.assert_allclose(got, theta - lr * (g + g_p) / 2, rtol=1e-12, atol=1e-12)
    losses = [0.5 * (theta - c) @ a @ (theta - c) for a, c in zip(mats, centers)]
    assert float(loss) == pytest.approx(np.mean(losses), rel=1e-12)
    assert opt.per_domain and opt.closure_calls == 2 * S


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rho": -0.5}, "rho must be >= 0"), ({"alpha": -1e-3}, "alpha must be >= 0"),
     ({"eps": 0.0}, "eps must be > 0")],
)
def test_class_bad_arguments(kwargs, match):
    params, *_ = _problem()
    with pytest.raises(ValueError, match=match):
        SAGM(params, torch.optim.SGD, lr=0.1, **kwargs)


def _pooled(params, mats, centers):
    """One closure on the pooled loss 1/S sum_d L_d (what the training loop builds for equal
    per-domain batches), counting its calls."""
    calls = []

    def closure():
        for p in params:
            p.grad = None
        x = torch.cat(params)
        loss = sum(0.5 * (x - torch.tensor(c)) @ torch.tensor(a) @ (x - torch.tensor(c))
                   for a, c in zip(mats, centers)) / len(mats)
        loss.backward()
        calls.append(1)
        return loss

    return closure, calls


def test_default_is_one_pooled_closure_two_passes_as_the_authors_code():
    params, _, mats, centers, theta, _ = _problem(seed=21)
    rho, alpha, lr = 0.2, 0.01, 0.1
    opt = SAGM(params, torch.optim.SGD, rho=rho, alpha=alpha, lr=lr)
    closure, calls = _pooled(params, mats, centers)
    opt.step(closure)
    assert not opt.per_domain and len(calls) == 2 and opt.closure_calls == 2
    g = np.mean([_grad(mats, centers, d, theta) for d in range(S)], axis=0)
    x = theta + (rho / np.linalg.norm(g) - alpha) * g
    g_p = np.mean([_grad(mats, centers, d, x) for d in range(S)], axis=0)
    got = torch.cat([p.detach() for p in params]).numpy()
    np.testing.assert_allclose(got, theta - lr * (g + g_p) / 2, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="closure must be callable"):
        opt.step([closure])  # the pooled form takes one closure


def test_pooled_and_per_domain_forms_agree_for_equal_batches():
    finals = []
    for per_domain in (False, True):
        params, closures, mats, centers, _, _ = _problem(seed=22)
        opt = SAGM(params, torch.optim.SGD, rho=0.1, lr=0.05, per_domain=per_domain)
        pooled, _ = _pooled(params, mats, centers)
        for _ in range(3):
            opt.step(closures if per_domain else pooled)
        finals.append(torch.cat([p.detach() for p in params]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-10, atol=1e-12)


def test_per_domain_form_warns_when_domain_batches_differ():
    import warnings

    params, closures, *_ = _problem(seed=23)
    opt = SAGM(params, torch.optim.SGD, lr=0.1, per_domain=True)
    for c, n in zip(closures, (8, 8, 8)):
        c.batch_size = n
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closures)  # equal sizes: silent
    closures[1].batch_size = 5
    with pytest.warns(UserWarning, match=r"different sizes \[8, 5, 8\]"):
        opt.step(closures)
    with pytest.raises(TypeError, match="per_domain must be a bool"):
        SAGM(params, torch.optim.SGD, lr=0.1, per_domain="yes")


def test_fit_gives_the_pooled_batch_by_default_and_domains_on_request():
    from flatlab.train import fit

    torch.manual_seed(0)
    domains = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(3)]
    for per_domain, passes, sizes in ((False, 2, [12, 12]), (True, 6, [4] * 6)):
        model = torch.nn.Linear(5, 3)
        seen: list[int] = []
        model.register_forward_hook(lambda m, a, o, seen=seen: seen.append(a[0].shape[0]))
        res = fit(model, SAGM(model.parameters(), torch.optim.SGD, lr=0.1,
                              per_domain=per_domain), domains, steps=2, batch_size=4,
                  progress=False)
        assert res.passes_per_step == passes and seen[:passes] == sizes
