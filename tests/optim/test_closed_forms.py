"""One step of each method on L(x) = 0.5 x^T A x (float64) against its closed form, to 1e-10.

With base SGD(lr=1) and no momentum the parameter change is minus the descent gradient d.
"""

from __future__ import annotations

import pytest
import torch

from flatlab.optim import GAM, SAM, SAMGAM
from flatlab.optim.gam import hessian_vector_product

TOL = {"rtol": 1e-10, "atol": 1e-10}


def spd(n: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    return q @ q.T / n + 0.5 * torch.eye(n, dtype=torch.float64)


def start(n: int = 5) -> torch.Tensor:
    return torch.linspace(-1.0, 1.5, n, dtype=torch.float64)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def descent(make, loss_fn, x0: torch.Tensor) -> torch.Tensor:
    """Run one step from x0 with base SGD(lr=1); return the descent gradient d = x0 - x1."""
    x = torch.nn.Parameter(x0.clone())
    opt = make([x])

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = loss_fn(x)
        backward(loss)
        return loss

    opt.step(closure)
    return x0 - x.detach()


def quadratic(a: torch.Tensor):
    return lambda x: 0.5 * x @ a @ x


def test_sam_descent_gradient():
    a, x, rho = spd(), start(), 0.3
    d = descent(lambda p: SAM(p, torch.optim.SGD, rho=rho, lr=1.0), quadratic(a), x)
    torch.testing.assert_close(d, a @ (x + rho * unit(a @ x)), **TOL)


def test_usam_descent_gradient():
    a, x, rho = spd(), start(), 0.3
    make = lambda p: SAM(p, torch.optim.SGD, rho=rho, normalize=False, lr=1.0)  # noqa: E731
    d = descent(make, quadratic(a), x)
    torch.testing.assert_close(d, a @ (x + rho * (a @ x)), **TOL)


def test_asam_descent_gradient():
    a, x, rho, eta = spd(), start(), 0.3, 0.01
    make = lambda p: SAM(  # noqa: E731
        p, torch.optim.SGD, rho=rho, adaptive=True, eta=eta, adaptive_bias=True, lr=1.0
    )
    d = descent(make, quadratic(a), x)
    t, g = x.abs() + eta, a @ x
    e = rho * t**2 * g / (t * g).norm()
    torch.testing.assert_close(d, a @ (x + e), **TOL)


def test_asam_default_rescales_weights_only_like_the_authors_code():
    """ASAM's code multiplies by T = |w| + eta only parameters named weight; biases get T = I."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    rho, eta = 0.4, 0.01
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    loss_fn = torch.nn.functional.mse_loss
    gw, gb = torch.autograd.grad(loss_fn(model(x), y), [model.weight, model.bias])
    tw = w0.abs() + eta
    norm = torch.cat([(tw * gw).flatten(), gb]).norm()
    ew, eb = rho * tw**2 * gw / norm, rho * gb / norm
    wp, bp = (w0 + ew).requires_grad_(), (b0 + eb).requires_grad_()
    dw, db = torch.autograd.grad(loss_fn(torch.nn.functional.linear(x, wp, bp), y), [wp, bp])
    for by_name in (True, False):
        m = torch.nn.Linear(3, 2).double()
        with torch.no_grad():
            m.weight.copy_(w0)
            m.bias.copy_(b0)
        opt = SAM(m.parameters(), torch.optim.SGD, rho=rho, adaptive=True, eta=eta, lr=1.0,
                  model=m if by_name else None)

        def closure(m=m, opt=opt):
            opt.zero_grad()
            loss = loss_fn(m(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        torch.testing.assert_close(w0 - m.weight.detach(), dw, **TOL)
        torch.testing.assert_close(b0 - m.bias.detach(), db, **TOL)


def test_clipping_acts_on_the_descent_gradient_only():
    a, x, rho, c = spd(), start(), 0.3, 0.05
    make = lambda p: SAM(p, torch.optim.SGD, rho=rho, normalize=False, clip_grad_norm=c, lr=1.0)  # noqa: E731
    d = descent(make, quadratic(a), x)
    full = a @ (x + rho * (a @ x))  # the ascent used the unclipped gradient
    torch.testing.assert_close(d, full * (c / (full.norm() + 1e-6)), **TOL)


def test_descent_hook_sees_the_descent_gradient_once_per_step():
    a, x, rho = spd(), start(), 0.3
    seen = []

    def hook(params):
        seen.append(params[0].grad.clone())
        params[0].grad.mul_(0.5)

    make = lambda p: SAM(p, torch.optim.SGD, rho=rho, descent_hook=hook, lr=1.0)  # noqa: E731
    d = descent(make, quadratic(a), x)
    expected = a @ (x + rho * unit(a @ x))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, **TOL)
    torch.testing.assert_close(d, 0.5 * expected, **TOL)


def test_exact_hvp_term_is_a_times_the_unit_gradient():
    a, x0 = spd(), start()
    x = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(quadratic(a)(x), [x], create_graph=True)
    v = unit(g.detach())
    (hv,) = hessian_vector_product([g], [x], [v])
    torch.testing.assert_close(hv, a @ unit(a @ x0), **TOL)


def gam_exact_closed_form(a, x, rho, alpha, base_grad):
    f = a @ unit(a @ x)
    x_adv = x + rho * unit(f)
    return base_grad + alpha * rho * (a @ unit(a @ x_adv))


def test_gam_exact_descent_gradient():
    a, x, rho, alpha = spd(), start(), 0.2, 0.7
    make = lambda p: GAM(p, torch.optim.SGD, rho=rho, alpha=alpha, hvp="exact", lr=1.0)  # noqa: E731
    d = descent(make, quadratic(a), x)
    torch.testing.assert_close(d, gam_exact_closed_form(a, x, rho, alpha, a @ x), **TOL)


def test_samgam_descent_gradient():
    a, x, rho, alpha, sam_rho = spd(), start(), 0.2, 0.7, 0.1
    make = lambda p: SAMGAM(p, torch.optim.SGD, rho=rho, alpha=alpha, sam_rho=sam_rho, lr=1.0)  # noqa: E731
    d = descent(make, quadratic(a), x)
    g_sam = a @ (x + sam_rho * unit(a @ x))
    torch.testing.assert_close(d, gam_exact_closed_form(a, x, rho, alpha, g_sam), **TOL)


def test_gam_finite_difference_algorithm_2():
    a, x = spd(), start()
    rho, fd_rho, alpha, beta, gamma = 0.2, 0.03, 0.6, 0.5, 0.1
    make = lambda p: GAM(  # noqa: E731
        p, torch.optim.SGD, rho=rho, fd_rho=fd_rho, alpha=alpha, beta=beta, gamma=gamma, lr=1.0
    )
    d = descent(make, quadratic(a), x)
    g0 = a @ x
    g1 = a @ (x + fd_rho * unit(g0))
    t2 = x + rho * unit(g1 - g0)
    g2 = a @ t2
    g3 = a @ (t2 + fd_rho * unit(g2))
    h_plus = alpha * g1 + (1 - alpha) * g3
    h_minus = beta * g0 + (1 - beta) * g2  # beta on g0, as in the paper (the code omits it)
    perp = h_minus - (h_minus @ h_plus) / (h_plus @ h_plus) * h_plus
    torch.testing.assert_close(d, h_plus - gamma * perp, **TOL)


def fd_term(loss_fn, x, fd_rho):
    """(g1 - g0) / rho' as GAM's first two passes compute it (alpha=1, gamma=0 make d = g1)."""
    make = lambda p: GAM(p, torch.optim.SGD, rho=0.0, fd_rho=fd_rho, alpha=1.0, gamma=0.0, lr=1.0)  # noqa: E731
    g1 = descent(make, loss_fn, x)
    xg = x.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(loss_fn(xg), [xg])
    return (g1 - g0) / fd_rho


def test_finite_difference_term_is_exact_on_a_quadratic():
    a, x = spd(), start()
    got = fd_term(quadratic(a), x, 1e-3)
    torch.testing.assert_close(got, a @ unit(a @ x), rtol=1e-9, atol=1e-9)


def test_finite_difference_term_converges_linearly():
    a, x = spd(), start()

    def loss_fn(v):
        return 0.5 * v @ a @ v + 0.25 * (v**4).sum()

    g = a @ x + x**3
    exact = (a + torch.diag(3 * x**2)) @ unit(g)
    radii = [4e-3, 2e-3, 1e-3, 5e-4]
    errors = [(fd_term(loss_fn, x, r) - exact).norm().item() for r in radii]
    ratios = [e0 / e1 for e0, e1 in zip(errors, errors[1:])]
    assert errors[-1] < 1e-2 * exact.norm().item()
    assert all(ratio == pytest.approx(2.0, rel=0.05) for ratio in ratios), ratios


def test_gam_adaptive_finite_difference_matches_the_formulas():
    """GAM(adaptive=True): every ascent v becomes T^2 v / ||T v||, T = |theta_now| (eta=0), as
    the authors' code's adaptive flag does (the h- weighting follows the paper, see gam.py)."""
    a, x = spd(), start()
    rho, fd_rho, alpha, beta, gamma = 0.3, 0.05, 0.6, 0.5, 0.1
    make = lambda p: GAM(  # noqa: E731
        p, torch.optim.SGD, rho=rho, fd_rho=fd_rho, alpha=alpha, beta=beta, gamma=gamma,
        adaptive=True, lr=1.0,
    )
    d = descent(make, quadratic(a), x)

    def ascent(point, v, r):
        t = point.abs()
        return r * t**2 * v / (t * v).norm()

    g0 = a @ x
    g1 = a @ (x + ascent(x, g0, fd_rho))
    t2 = x + ascent(x, g1 - g0, rho)
    g2 = a @ t2
    g3 = a @ (t2 + ascent(t2, g2, fd_rho))
    h_plus, h_minus = alpha * g1 + (1 - alpha) * g3, beta * g0 + (1 - beta) * g2
    expected = h_plus - gamma * (h_minus - (h_minus @ h_plus) / (h_plus @ h_plus) * h_plus)
    torch.testing.assert_close(d, expected, **TOL)
    with pytest.raises(ValueError, match="finite_difference"):
        GAM([torch.nn.Parameter(x.clone())], torch.optim.SGD, hvp="exact", adaptive=True, lr=0.1)
