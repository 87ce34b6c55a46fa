"""DGSAM: the update kernel on float64 quadratics (exact), pass counts, rho=0, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatlab.optim.dgsam import dgsam_gradient, random_order

S = 3
RHO = 0.3


def _problem(seed: int = 0, s: int = S, dim: int = 4):
    """S quadratic domains L_d = 1/2 (x - c_d)^T A_d (x - c_d) over params (a (2,), b (dim-2,))."""
    rng = np.random.default_rng(seed)
    mats, centers = [], []
    for _ in range(s):
        m = rng.standard_normal((dim, dim))
        mats.append(m @ m.T + 0.5 * np.eye(dim))
        centers.append(rng.standard_normal(dim))
    theta = rng.standard_normal(dim)
    params = [
        torch.tensor(theta[:2], dtype=torch.float64, requires_grad=True),
        torch.tensor(theta[2:], dtype=torch.float64, requires_grad=True),
    ]
    visited: list[tuple[int, np.ndarray]] = []

    def make(d: int):
        a = torch.tensor(mats[d])
        c = torch.tensor(centers[d])

        def closure() -> torch.Tensor:
            for p in params:
                p.grad = None
            x = torch.cat(params)
            visited.append((d, x.detach().numpy().copy()))
            loss = 0.5 * (x - c) @ a @ (x - c)
            loss.backward()
            return loss

        return closure

    closures = [make(d) for d in range(s)]
    return params, closures, mats, centers, theta, visited


def _grad(mats, centers, d, x):
    return mats[d] @ (x - centers[d])


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 0, 1], [1, 2, 0]])
def test_evaluation_points_restore_and_combined_gradient(order):
    params, closures, mats, centers, theta, visited = _problem()
    combined, losses = dgsam_gradient(params, closures, order, rho=RHO)

    # hand computation: g_j at theta + rho * sum_{k<j} g_k / ||g_k||, domain order[(j-1) % S]
    x = theta.copy()
    grads = []
    for j in range(S + 1):
        d = order[j % S]
        assert visited[j][0] == d
        np.testing.assert_allclose(visited[j][1], x, rtol=0, atol=1e-12)
        g = _grad(mats, centers, d, x)
        grads.append(g)
        x = x + RHO * g / (np.linalg.norm(g) + 1e-12)
    assert len(visited) == S + 1 and len(losses) == S + 1

    # parameters restored exactly (bitwise) before the base step
    restored = torch.cat([p.detach() for p in params]).numpy()
    assert np.array_equal(restored, theta)

    expected = S / (S + 1) * np.sum(grads, axis=0)
    np.testing.assert_allclose(torch.cat(combined).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_perturbed_mean_combines_one_perturbed_gradient_per_domain():
    params, closures, mats, centers, theta, visited = _problem(seed=1)
    order = [1, 0, 2]
    combined, _ = dgsam_gradient(params, closures, order, rho=RHO, combine="perturbed_mean")
    x = theta.copy()
    grads = []
    for j in range(S + 1):
        g = _grad(mats, centers, order[j % S], x)
        grads.append(g)
        x = x + RHO * g / np.linalg.norm(g)
    expected = np.mean(grads[1:], axis=0)
    np.testing.assert_allclose(torch.cat(combined).numpy(), expected, rtol=1e-12, atol=1e-12)
    assert sorted(d for d, _ in visited[1:]) == list(range(S))  # each domain exactly once


def test_rho_zero_authors_rule_is_not_erm_but_its_formula():
    """At rho=0 the authors' rule gives S/(S+1) (sum_d g_d + g_{pi[0]}): biased toward pi[0]."""
    params, closures, mats, centers, theta, _ = _problem(seed=2)
    order = [2, 0, 1]
    combined, _ = dgsam_gradient(params, closures, order, rho=0.0)
    g = [_grad(mats, centers, d, theta) for d in range(S)]
    expected = S / (S + 1) * (np.sum(g, axis=0) + g[order[0]])
    got = torch.cat(combined).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    erm = np.mean(g, axis=0)
    assert not np.allclose(got, erm)
    assert not np.allclose(got, S * erm)  # not even a rescaled ERM gradient


def test_rho_zero_perturbed_mean_is_erm():
    params, closures, mats, centers, theta, _ = _problem(seed=3)
    combined, _ = dgsam_gradient(params, closures, [1, 2, 0], rho=0.0, combine="perturbed_mean")
    erm = np.mean([_grad(mats, centers, d, theta) for d in range(S)], axis=0)
    np.testing.assert_allclose(torch.cat(combined).numpy(), erm, rtol=1e-12, atol=1e-12)


def test_single_domain_perturbed_mean_is_sam():
    params, closures, mats, centers, theta, _ = _problem(seed=4, s=1)
    combined, _ = dgsam_gradient(params, closures, [0], rho=RHO, combine="perturbed_mean")
    g = _grad(mats, centers, 0, theta)
    sam = _grad(mats, centers, 0, theta + RHO * g / np.linalg.norm(g))
    np.testing.assert_allclose(torch.cat(combined).numpy(), sam, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("s", [1, 2, 5])
def test_kernel_makes_exactly_s_plus_one_single_domain_passes(s):
    params, closures, *_ = _problem(seed=5, s=s)
    calls = [0] * s

    def counted(d):
        def c():
            calls[d] += 1
            return closures[d]()

        return c

    order = random_order(s, torch.Generator().manual_seed(0))
    dgsam_gradient(params, [counted(d) for d in range(s)], order, rho=RHO)
    assert sum(calls) == s + 1
    assert calls[order[0]] == 2 if s > 1 else calls[0] == 2


def test_zero_gradient_gives_finite_result():
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)

    def flat():
        p.grad = None
        loss = (p * 0).sum()
        loss.backward()
        return loss

    combined, _ = dgsam_gradient([p], [flat, flat], [0, 1], rho=0.1)
    assert torch.isfinite(combined[0]).all() and torch.equal(p.detach(), torch.zeros(3))


def test_params_restored_when_a_closure_raises():
    params, closures, *_ = _problem(seed=6)
    before = [p.detach().clone() for p in params]

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        dgsam_gradient(params, [closures[0], closures[1], boom], [0, 1, 2], rho=RHO)
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


def test_random_order_is_a_permutation_and_varies():
    gen = torch.Generator().manual_seed(0)
    orders = {tuple(random_order(4, gen)) for _ in range(30)}
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders) and len(orders) > 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rho": -0.1}, ValueError, "rho must be >= 0, got -0.1"),
        ({"rho": 0.1, "combine": "sum"}, ValueError, "combine must be one of"),
        ({"rho": 0.1, "eps": 0.0}, ValueError, "eps must be > 0"),
        ({"rho": 0.1, "order": [0, 0, 1]}, ValueError, "order must be a permutation"),
        ({"rho": 0.1, "order": [0, 1]}, ValueError, "order must be a permutation"),
        ({"rho": 0.1, "closures": []}, ValueError, "empty list"),
        ({"rho": 0.1, "closures": "single"}, TypeError, "single callable"),
        ({"rho": 0.1, "closures": [1, 2, 3]}, TypeError, r"closures\[0\] must be callable"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    params, closures, *_ = _problem()
    kwargs = dict(kwargs)
    order = kwargs.pop("order", [0, 1, 2])
    cl = kwargs.pop("closures", closures)
    if cl == "single":
        cl = closures[0]
    with pytest.raises(error, match=match):
        dgsam_gradient(params, cl, order, **kwargs)


# ------------------------------------------------------------------------------ the class
from flatlab.optim.dgsam import DGSAM  # noqa: E402


def test_class_step_is_base_step_with_combined_gradient():
    params, closures, mats, centers, theta, _ = _problem(seed=9)
    lr = 0.1
    opt = DGSAM(params, torch.optim.SGD, rho=RHO, lr=lr, domain_order=[2, 1, 0])
    opt.step(closures)
    x, grads = theta.copy(), []
    for j in range(S + 1):
        g = _grad(mats, centers, [2, 1, 0][j % S], x)
        grads.append(g)
        x = x + RHO * g / np.linalg.norm(g)
    expected = theta - lr * S / (S + 1) * np.sum(grads, axis=0)
    got = torch.cat([p.detach() for p in params]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert opt.last_order == [2, 1, 0] and len(opt.last_losses) == S + 1
    assert opt.closure_calls == S + 1


def test_class_perturbed_mean_at_rho_zero_equals_pooled_sgd():
    params, closures, *_ = _problem(seed=10)
    ref, *_ = _problem(seed=10)
    opt = DGSAM(params, torch.optim.SGD, rho=0.0, combine="perturbed_mean", lr=0.05)
    sgd = torch.optim.SGD(ref, lr=0.05)
    for _ in range(3):
        opt.step(closures)

        def pooled():
            for p in ref:
                p.grad = None
            loss = _pooled_loss(ref, seed=10)  # mean of the domain losses = pooled loss
            loss.backward()
            return loss

        sgd.step(pooled)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)


def _pooled_loss(params, seed):
    _, _, mats, centers, *_ = _problem(seed=seed)
    x = torch.cat(params)
    return sum(
        0.5 * (x - torch.tensor(c)) @ torch.tensor(a) @ (x - torch.tensor(c))
        for a, c in zip(mats, centers)
    ) / S


def test_seeded_order_resumes_bit_for_bit():
    def make():
        params, closures, *_ = _problem(seed=11)
        return params, closures, DGSAM(params, torch.optim.SGD, rho=RHO, lr=0.01, seed=3)

    params_a, cl_a, a = make()
    orders_a = []
    for _ in range(4):
        a.step(cl_a)
        orders_a.append(a.last_order)
    params_b, cl_b, b = make()
    for _ in range(2):
        b.step(cl_b)
    sd = b.state_dict()
    params_c, cl_c, c = make()
    with torch.no_grad():
        for pc, pb in zip(params_c, params_b):
            pc.copy_(pb)
    c.load_state_dict(sd)
    orders_c = []
    for _ in range(2):
        c.step(cl_c)
        orders_c.append(c.last_order)
    assert orders_c == orders_a[2:]
    for pa, pc in zip(params_a, params_c):
        assert torch.equal(pa, pc)


def test_nonfinite_loss_skips_the_step():
    params, closures, *_ = _problem(seed=12)
    before = [p.detach().clone() for p in params]

    def nan_closure():
        for p in params:
            p.grad = None
        loss = torch.cat(params).sum() * float("nan")
        loss.backward()
        return loss

    opt = DGSAM(params, torch.optim.SGD, rho=RHO, lr=0.1)
    assert opt.step([closures[0], nan_closure, closures[2]]) is None
    assert opt.skipped_steps == 1
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: DGSAM(p, torch.optim.SGD, rho=-0.1, lr=0.1), ValueError, "rho must be >= 0"),
        (lambda p: DGSAM(p, torch.optim.SGD, combine="x", lr=0.1), ValueError, "combine must be"),
        (lambda p: DGSAM(p, torch.optim.SGD, num_domains=0, lr=0.1), ValueError,
         "num_domains must be >= 1"),
        (lambda p: DGSAM(p, torch.optim.SGD, domain_order=[0, 2], lr=0.1), ValueError,
         "order must be a permutation"),
        (lambda p: DGSAM(p, torch.optim.SGD, eps=0, lr=0.1), ValueError, "eps must be > 0"),
    ],
)
def test_class_bad_constructor_arguments(make, error, match):
    params, *_ = _problem()
    with pytest.raises(error, match=match):
        make(params)


def test_class_bad_step_arguments():
    params, closures, *_ = _problem()
    opt = DGSAM(params, torch.optim.SGD, lr=0.1, num_domains=3)
    with pytest.raises(ValueError, match="len\\(closures\\) must equal num_domains=3, got 2"):
        opt.step(closures[:2])
    with pytest.raises(ValueError, match="one per"):
        opt.step([])
    with pytest.raises(TypeError, match="one per training domain, got a single callable"):
        opt.step(closures[0])


# --------------------------------------------------- pass counts through the training loop
def _count_passes(opt_factory, s=3, batch=4, steps=2):
    from flatlab.train import fit

    torch.manual_seed(0)
    domains = [(torch.randn(16, 5), torch.randint(0, 3, (16,))) for _ in range(s)]
    model = torch.nn.Linear(5, 3)
    sizes: list[int] = []
    model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    result = fit(model, opt_factory(model.parameters()), domains, steps=steps,
                 batch_size=batch, progress=False)
    return result.passes_per_step, sizes[: int(result.passes_per_step)]


@pytest.mark.parametrize("s", [2, 3, 5])
def test_dgsam_makes_s_plus_one_single_domain_passes_in_fit(s):
    passes, sizes = _count_passes(lambda p: DGSAM(p, torch.optim.SGD, lr=0.1), s=s)
    assert passes == s + 1 and sizes == [4] * (s + 1)


def test_sam_makes_two_pooled_passes_and_erm_one_in_fit():
    from flatlab.optim import SAM

    passes, sizes = _count_passes(lambda p: SAM(p, torch.optim.SGD, rho=0.05, lr=0.1))
    assert passes == 2 and sizes == [12, 12]
    passes, sizes = _count_passes(lambda p: torch.optim.SGD(p, lr=0.1))
    assert passes == 1 and sizes == [12]


def test_sagm_makes_two_pooled_passes_worth_in_fit():
    from flatlab.optim.sagm import SAGM

    passes, sizes = _count_passes(lambda p: SAGM(p, torch.optim.SGD, lr=0.1))
    assert passes == 2 and sizes == [12, 12]  # default: one pooled closure, as the authors
    passes, sizes = _count_passes(lambda p: SAGM(p, torch.optim.SGD, lr=0.1, per_domain=True))
    assert passes == 6 and sizes == [4] * 6


def test_empty_domain_is_a_clear_error_in_fit():
    from flatlab.train import fit

    model = torch.nn.Linear(5, 3)
    domains = [(torch.randn(8, 5), torch.randint(0, 3, (8,))),
               (torch.randn(0, 5), torch.zeros(0, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"train\[1\] must not be empty"):
        fit(model, DGSAM(model.parameters(), torch.optim.SGD, lr=0.1), domains, steps=1,
            progress=False)


# --------------------------------------------------- per-domain radius rule (fair comparison)
def _separable(s: int, aligned: bool):
    """S quadratic domains whose gradients stay orthogonal (domain d only sees coordinate d) or
    stay aligned (every domain pulls toward the same centre), so the sum of the S normalized
    ascent steps has a closed-form norm: sqrt(S) r (orthogonal) or S r (aligned)."""
    theta = np.arange(1.0, s + 1.0)
    params = [torch.tensor(theta, dtype=torch.float64, requires_grad=True)]
    visited: list[np.ndarray] = []

    def make(d: int):
        def closure() -> torch.Tensor:
            params[0].grad = None
            x = params[0]
            visited.append(x.detach().numpy().copy())
            loss = (0.5 * (d + 1.0) * (x**2).sum()) if aligned else 0.5 * (d + 1.0) * x[d] ** 2
            loss.backward()
            return loss
        return closure

    return params, [make(d) for d in range(s)], theta, visited


@pytest.mark.parametrize("s", [2, 3, 5])
@pytest.mark.parametrize(("rule", "orthogonal", "aligned"), [
    ("full", lambda s: np.sqrt(s), lambda s: s),
    ("sqrt", lambda s: 1.0, lambda s: np.sqrt(s)),
    ("split", lambda s: 1.0 / np.sqrt(s), lambda s: 1.0),
])
def test_total_perturbation_norm_matches_the_closed_form(rule, orthogonal, aligned, s):
    from flatlab.optim.dgsam import domain_radius_factor

    rho = 0.1
    for is_aligned, closed in ((False, orthogonal), (True, aligned)):
        params, closures, theta, visited = _separable(s, is_aligned)
        dgsam_gradient(params, closures, list(range(s)), rho=rho, radius_rule=rule)
        total = visited[s] - theta  # the last pass is taken at theta + e (all S steps applied)
        assert np.linalg.norm(total) == pytest.approx(closed(s) * rho, rel=1e-9)
        # every single step has radius rho * factor
        steps = np.diff(np.array(visited[: s + 1]), axis=0)
        np.testing.assert_allclose(np.linalg.norm(steps, axis=1),
                                   rho * domain_radius_factor(rule, s), rtol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_split_rule_keeps_the_total_perturbation_within_rho(seed):
    params, closures, mats, centers, theta, visited = _problem(seed=seed, s=4)
    dgsam_gradient(params, closures, [3, 1, 0, 2], rho=RHO, radius_rule="split")
    assert np.linalg.norm(visited[4][1] - theta) <= RHO * (1 + 1e-12)
    # and the evaluation points are the hand computation with r = rho / S
    x = theta.copy()
    for j, d in enumerate([3, 1, 0, 2, 3]):
        np.testing.assert_allclose(visited[j][1], x, rtol=0, atol=1e-12)
        g = _grad(mats, centers, d, x)
        x = x + RHO / 4 * g / (np.linalg.norm(g) + 1e-12)


def test_class_radius_rule_equals_the_kernel_and_is_validated():
    params, closures, *_ = _problem(seed=3)
    expected, _ = dgsam_gradient(params, closures, [2, 0, 1], rho=RHO, radius_rule="sqrt")
    p0 = [p.detach().clone() for p in params]
    opt = DGSAM(params, torch.optim.SGD, rho=RHO, radius_rule="sqrt", lr=1.0,
                domain_order=[2, 0, 1])
    opt.step(closures)
    for p, a, g in zip(params, p0, expected):
        torch.testing.assert_close(p.detach(), a - g, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="radius_rule must be one of 'full', 'sqrt', 'split'"):
        DGSAM(params, torch.optim.SGD, radius_rule="half", lr=0.1)
    with pytest.raises(ValueError, match="radius_rule must be one of"):
        dgsam_gradient(params, closures, [0, 1, 2], rho=RHO, radius_rule="S")
