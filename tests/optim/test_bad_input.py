"""Bad input raises ValueError/TypeError with a message that names the bad value."""

from __future__ import annotations

import pytest
import torch

from flatlab.optim import GAM, SAM, SAMGAM
from tests.optim._registry import REGISTRY


def params():
    return [torch.nn.Parameter(torch.ones(3))]


CONSTRUCTION = [
    ("negative rho", lambda: SAM(params(), torch.optim.SGD, rho=-0.1, lr=0.1), ValueError,
     "rho must be >= 0, got -0.1"),
    ("string rho", lambda: SAM(params(), torch.optim.SGD, rho="0.05", lr=0.1), TypeError,
     "rho must be a real number, got '0.05'"),
    ("nan rho", lambda: SAM(params(), torch.optim.SGD, rho=float("nan"), lr=0.1), ValueError,
     "rho must not be NaN"),
    ("base is a module", lambda: SAM(params(), torch.nn.Linear, lr=0.1), TypeError,
     "base must be a torch.optim.Optimizer subclass or instance, got <class"),
    ("base is a string", lambda: SAM(params(), "sgd", lr=0.1), TypeError,
     "base must be a torch.optim.Optimizer subclass or instance, got 'sgd'"),
    ("base kwargs with an instance",
     lambda: SAM(None, torch.optim.SGD(params(), lr=0.1), lr=0.2), TypeError,
     r"base_kwargs must be empty when base is an instance, got \['lr'\]"),
    ("params differ from the instance's",
     lambda: SAM(params(), torch.optim.SGD(params(), lr=0.1)), ValueError,
     "params must be None or the base optimizer's parameters"),
    ("unknown base kwarg", lambda: SAM(params(), torch.optim.SGD, lr=0.1, rhoo=0.1), TypeError,
     "rhoo"),
    ("bad sync", lambda: SAM(params(), torch.optim.SGD, sync="all", lr=0.1), ValueError,
     "sync must be one of 'global', 'local', got 'all'"),
    ("bad on_nonfinite", lambda: SAM(params(), torch.optim.SGD, on_nonfinite="warn", lr=0.1),
     ValueError, "on_nonfinite must be one of 'skip', 'raise', got 'warn'"),
    ("adaptive not bool", lambda: SAM(params(), torch.optim.SGD, adaptive=1, lr=0.1), TypeError,
     "adaptive must be a bool, got 1"),
    ("negative clip", lambda: SAM(params(), torch.optim.SGD, clip_grad_norm=-1.0, lr=0.1),
     ValueError, "clip_grad_norm must be > 0, got -1.0"),
    ("hook not callable", lambda: SAM(params(), torch.optim.SGD, descent_hook=3, lr=0.1),
     TypeError, "descent_hook must be callable, got 3"),
    ("scaler not a scaler", lambda: SAM(params(), torch.optim.SGD, grad_scaler=2.0, lr=0.1),
     TypeError, "grad_scaler must be a torch.amp.GradScaler, got 2.0"),
    ("bad hvp", lambda: GAM(params(), torch.optim.SGD, hvp="fd", lr=0.1), ValueError,
     "hvp must be one of 'exact', 'finite_difference', got 'fd'"),
    ("beta above 1", lambda: GAM(params(), torch.optim.SGD, beta=1.5, lr=0.1), ValueError,
     r"beta must be in \[0.0, 1.0\], got 1.5"),
    ("negative fd_rho", lambda: GAM(params(), torch.optim.SGD, fd_rho=-1.0, lr=0.1), ValueError,
     "fd_rho must be >= 0, got -1.0"),
    ("sam_rho with finite differences", lambda: GAM(params(), torch.optim.SGD, sam_rho=0.1, lr=0.1),
     ValueError, "sam_rho must be None for hvp='finite_difference'"),
    ("SAMGAM with finite differences",
     lambda: SAMGAM(params(), torch.optim.SGD, hvp="finite_difference", lr=0.1), ValueError,
     "hvp must be 'exact' for SAMGAM, got 'finite_difference'"),
]


@pytest.mark.parametrize(
    ("what", "make", "exc", "match"), CONSTRUCTION, ids=[c[0] for c in CONSTRUCTION]
)
def test_bad_construction(what, make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_bad_closures(entry):
    p = torch.nn.Parameter(torch.ones(3))
    opt = entry.build([p], torch.optim.SGD, lr=0.1)
    if opt.per_domain:
        with pytest.raises(ValueError, match="sequence of closures"):
            opt.step()
        with pytest.raises(TypeError, match=r"closures\[0\] must be callable, got 3"):
            opt.step([3])
        return
    with pytest.raises(ValueError, match="needs a closure .* got None"):
        opt.step()
    with pytest.raises(TypeError, match="closure must be callable, got 3"):
        opt.step(3)


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_sparse_gradients_are_rejected(entry):
    emb = torch.nn.Embedding(4, 2, sparse=True)
    opt = entry.build(emb.parameters(), torch.optim.SGD, lr=0.1)

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2])).sum()
        backward(loss)
        return loss

    with pytest.raises(ValueError, match="does not support sparse gradients"):
        opt.step([closure] if opt.per_domain else closure)
