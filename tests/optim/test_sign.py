"""SignSGD / signum and RMSpropW: foreach kernels against a plain per-tensor loop (float64)."""

from __future__ import annotations

import pytest
import torch

from flatlab.optim import RMSpropW, SignSGD


def reference_signsgd(xs, grads_per_step, lr, momentum, weight_decay):
    xs = [x.clone() for x in xs]
    ms = [torch.zeros_like(x) for x in xs]
    for grads in grads_per_step:
        for i, (x, g) in enumerate(zip(xs, grads)):
            if momentum:
                ms[i] = momentum * ms[i] + (1 - momentum) * g
                direction = torch.sign(ms[i])
            else:
                direction = torch.sign(g)
            xs[i] = x - lr * direction - lr * weight_decay * x
    return xs


def reference_rmspropw(xs, grads_per_step, lr, beta, eps, weight_decay):
    xs = [x.clone() for x in xs]
    vs = [torch.zeros_like(x) for x in xs]
    for grads in grads_per_step:
        for i, (x, g) in enumerate(zip(xs, grads)):
            vs[i] = beta * vs[i] + (1 - beta) * g * g
            xs[i] = x - lr * g / (vs[i].sqrt() + eps) - lr * weight_decay * x
    return xs


def run(opt_cls, xs, grads_per_step, **kwargs):
    params = [torch.nn.Parameter(x.clone()) for x in xs]
    opt = opt_cls(params, **kwargs)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


def data(steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    xs = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [
        [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)
    ]
    grads[0][1][0] = 0.0  # sign(0) = 0
    return xs, grads


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_signsgd_matches_reference(momentum, weight_decay):
    xs, grads = data()
    kwargs = {"lr": 0.01, "momentum": momentum, "weight_decay": weight_decay}
    got, opt = run(SignSGD, xs, grads, **kwargs)
    want = reference_signsgd(xs, grads, **kwargs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all(("momentum_buffer" in s) == (momentum > 0) for s in opt.state.values())


def test_signsgd_step_size_is_lr_per_coordinate():
    xs, grads = data(steps=1)
    got, _ = run(SignSGD, xs, grads, lr=0.5)
    delta = torch.cat([(a - b).flatten() for a, b in zip(got, xs)]).abs()
    nonzero = torch.cat([g.flatten() for g in grads[0]]) != 0
    torch.testing.assert_close(delta[nonzero], torch.full_like(delta[nonzero], 0.5))
    assert torch.all(delta[~nonzero] == 0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_rmspropw_matches_reference(weight_decay):
    xs, grads = data()
    kwargs = {"lr": 0.01, "beta": 0.9, "eps": 1e-8, "weight_decay": weight_decay}
    got, opt = run(RMSpropW, xs, grads, **kwargs)
    want = reference_rmspropw(xs, grads, **kwargs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert all("square_avg" in s for s in opt.state.values())


def test_closure_protocol_and_state_dict_roundtrip():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    for cls in (SignSGD, RMSpropW):
        opt = cls(model.parameters(), lr=1e-2, **({"momentum": 0.9} if cls is SignSGD else {}))

        def closure(opt=opt):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses = [opt.step(closure).item() for _ in range(20)]
        assert losses[-1] < losses[0]
        fresh = cls(model.parameters(), lr=1e-2)
        fresh.load_state_dict(opt.state_dict())
        assert fresh.state_dict()["state"].keys() == opt.state_dict()["state"].keys()


@pytest.mark.parametrize(
    ("cls", "kwargs", "exc", "match"),
    [
        (SignSGD, {"lr": -1.0}, ValueError, "lr must be > 0, got -1.0"),
        (SignSGD, {"momentum": 1.0}, ValueError, r"momentum must be in \[0.0, 1.0\), got 1.0"),
        (SignSGD, {"weight_decay": "0.1"}, TypeError, "weight_decay must be a real number"),
        (RMSpropW, {"beta": -0.1}, ValueError, "beta must be in"),
        (RMSpropW, {"eps": -1e-8}, ValueError, "eps must be >= 0"),
    ],
)
def test_bad_arguments(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradient_is_rejected():
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = SignSGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
