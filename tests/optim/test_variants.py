"""GSAM, WSAM, LookSAM, FriendlySAM: exact reductions to SAM, float64 agreement with
pytorch_optimizer 4.1.0, LookSAM's call pattern, resume, the two-step API, skipped steps and
refused settings. The shell's contract (rho=0, per-group radii, closures) is tested for every
method in test_contract.py; this file tests what is specific to the variants."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatlab.optim import SAM
from flatlab.optim.variants import GSAM, WSAM, FriendlySAM, LookSAM

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")

STEPS = 10
LR = 0.05
RHO = 0.08


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(n: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=gen, dtype=torch.float64),
         torch.randint(0, 3, (16,), generator=gen))
        for _ in range(n)
    ]


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calls: list[int] | None = None):
    def closure():
        if calls is not None:
            calls[-1] += 1
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _run(opt_fn, seed: int = 0, batches=None, nan_at: int | None = None):
    """Train a fresh model ``STEPS`` steps with ``opt_fn(model)``; returns (model, opt, calls)."""
    model = _model(seed)
    opt = opt_fn(model)
    calls: list[int] = []
    for t, (x, y) in enumerate(batches or _batches()):
        if t == nan_at:
            x = x.clone()
            x[0, 0] = float("nan")
        calls.append(0)
        opt.step(_closure(model, x, y, calls))
    return model, opt, calls


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_bitwise(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q), (p - q).abs().max()


def _max_rel(a: nn.Module, b: nn.Module) -> float:
    num = max(float((p - q).abs().max()) for p, q in zip(_params(a), _params(b)))
    den = max(float(p.abs().max()) for p in _params(a))
    return num / den


def _sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


SAM_REF = lambda m: SAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9)  # noqa: E731


# ---------------------------------------------------------------------- exact reductions
@pytest.mark.parametrize(
    "name, build",
    [
        ("GSAM alpha=0", lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=RHO, alpha=0.0,
                                        lr=LR, momentum=0.9)),
        ("WSAM gamma=0.5 coupled", lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO,
                                                  gamma=0.5, decouple=False, lr=LR,
                                                  momentum=0.9)),
        ("LookSAM k=1", lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=1,
                                          lr=LR, momentum=0.9)),
        ("FriendlySAM sigma=0", lambda m: FriendlySAM(m.parameters(), torch.optim.SGD,
                                                      rho=RHO, sigma=0.0, lr=LR,
                                                      momentum=0.9)),
    ],
)
def test_reduces_to_sam_bit_for_bit(name, build):
    ref, _, _ = _run(SAM_REF)
    got, opt, calls = _run(build)
    _assert_bitwise(ref, got)
    assert calls == [2] * STEPS
    assert not any(k in s for s in opt.state.values() for k in ("looksam_gv", "fsam_ema"))


def test_wsam_decoupled_equals_sam_for_plain_sgd_to_rounding():
    """Decoupled WSAM at gamma=0.5: ``theta - lr g - lr (g_p - g) = theta - lr g_p``."""
    ref, _, _ = _run(lambda m: SAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR))
    got, _, _ = _run(lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, gamma=0.5, lr=LR))
    assert _max_rel(ref, got) < 1e-13


def test_variants_differ_from_sam_when_their_knob_is_on():
    ref, _, _ = _run(SAM_REF)
    for build in (
        lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=RHO, alpha=0.4, lr=LR, momentum=0.9),
        lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, gamma=0.9, lr=LR, momentum=0.9),
        lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR, momentum=0.9),
        lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
    ):
        got, _, _ = _run(build)
        assert _max_rel(ref, got) > 1e-6


# ---------------------------------------------------------------------- pytorch_optimizer
class _ConstantRho:
    """A stand-in for pytorch_optimizer's ProportionScheduler with a constant radius."""

    def __init__(self, rho: float) -> None:
        self.rho = rho

    def step(self) -> float:
        return self.rho


def _po_run(kind: str, **kw):
    """The same training with pytorch_optimizer's optimizer and its documented recipe."""
    po = pytorch_optimizer
    model = _model(0)
    if kind == "gsam":
        opt = po.GSAM(model.parameters(), _sgd(model.parameters()), model=model,
                      rho_scheduler=_ConstantRho(RHO), **kw)
    elif kind == "wsam":
        opt = po.WSAM(model, model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9,
                      **kw)
    elif kind == "looksam":
        opt = po.LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, **kw)
    else:
        opt = po.FriendlySAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9,
                             **kw)
    for x, y in _batches():
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if kind == "gsam":
            opt.set_closure(F.cross_entropy, x, y)
            opt.step()
        elif kind == "wsam":
            opt.zero_grad()
            opt.step(closure)
        else:  # LookSAM and FriendlySAM: gradients at theta first, then step(closure)
            closure()
            opt.step(closure)
    return model


@pytest.mark.parametrize(
    "kind, po_kw, ours",
    [
        ("gsam", {"alpha": 0.4},
         lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=RHO, alpha=0.4, lr=LR,
                        momentum=0.9)),
        ("wsam", {"gamma": 0.9},
         lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, gamma=0.9, lr=LR,
                        momentum=0.9)),
        ("wsam", {"gamma": 0.7, "decouple": False},
         lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, gamma=0.7, decouple=False,
                        lr=LR, momentum=0.9)),
        ("looksam", {"k": 3, "alpha": 0.7},
         lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=3, alpha=0.7,
                           layerwise=True, lr=LR, momentum=0.9)),
        ("fsam", {"sigma": 1.0, "lmbda": 0.9},
         lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=RHO, sigma=1.0, lmbda=0.9,
                               lr=LR, momentum=0.9)),
        ("fsam", {"sigma": 0.5, "lmbda": 0.6},
         lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=RHO, sigma=0.5, lmbda=0.6,
                               lr=LR, momentum=0.9)),
    ],
)
@pytest.mark.parametrize("float64_norm", [False, True], ids=["as-is", "float64-norm"])
def test_agrees_with_pytorch_optimizer_in_float64(kind, po_kw, ours, float64_norm, monkeypatch):
    """Ten float64 steps agree with pytorch_optimizer. As installed, it takes the global
    gradient norm in float32, which moves the result by ~1e-9 relative. With that norm
    computed in float64 the agreement is at float64 round-off (<= 6e-13), except LookSAM's
    1.4e-6: its reuse scale divides by ``||g_v|| + 1e-8`` (a literal in pytorch_optimizer;
    ours adds ``perturb_eps``), and the per-tensor ``||g_v||`` here are 4e-3..3e-2."""
    if float64_norm:
        monkeypatch.setattr(pytorch_optimizer.optimizer.sam, "get_global_gradient_norm",
                            _float64_squared_norm)
    ref = _po_run(kind, **po_kw)
    got, _, _ = _run(ours)
    tol = {False: 1e-8, True: 1e-12}[float64_norm]
    if kind == "looksam":
        tol = 1e-5
    assert _max_rel(ref, got) < tol
    assert _max_rel(ref, _model(0)) > 1e-3  # the runs moved


def _float64_squared_norm(param_groups, device=None, *, weight_adaptive=False):
    """pytorch_optimizer's ``get_global_gradient_norm`` (squared, shape (1,)) in float64,
    for groups without ``adaptive``."""
    grads = [p.grad for g in param_groups for p in g["params"] if p.grad is not None]
    return torch.stack([(t.double() ** 2).sum() for t in grads]).sum().reshape(1)


def test_looksam_global_differs_from_layerwise():
    a, _, _ = _run(lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR))
    b, _, _ = _run(lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR,
                                     layerwise=True))
    assert _max_rel(a, b) > 1e-8


# ---------------------------------------------------------------------- LookSAM's pattern
def test_looksam_call_pattern_and_closure_calls():
    model = _model(0)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR)
    calls, predicted = [], []
    for x, y in _batches(7):
        predicted.append(opt.closure_calls)
        calls.append(0)
        opt.step(_closure(model, x, y, calls))
    assert calls == [2, 1, 1, 2, 1, 1, 2]
    assert predicted == calls


def test_looksam_reuse_step_matches_formula():
    """A reuse step: ``d = g + alpha (||g|| / ||g_v||) g_v`` with the stored ``g_v``."""
    model = _model(0)
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, k=2, alpha=0.7, lr=LR)
    (x0, y0), (x1, y1) = _batches(2)
    opt.step(_closure(model, x0, y0))
    g_v = [opt.state[p]["looksam_gv"].clone() for p in model.parameters()]
    before = _params(model)
    probe = copy.deepcopy(model)
    F.cross_entropy(probe(x1), y1).backward()
    g = [p.grad for p in probe.parameters()]
    norm = lambda ts: math.sqrt(sum(float((t * t).sum()) for t in ts))  # noqa: E731
    scale = 0.7 * norm(g) / norm(g_v)
    opt.step(_closure(model, x1, y1))
    for p, p0, gi, vi in zip(model.parameters(), before, g, g_v):
        torch.testing.assert_close(p, p0 - LR * (gi + scale * vi), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "build",
    [
        lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR, momentum=0.9),
        lambda m: FriendlySAM(m.parameters(), torch.optim.Adam, rho=RHO, lr=1e-2),
        lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
        lambda m: GSAM(m.parameters(), torch.optim.AdamW, rho=RHO, lr=1e-2),
    ],
    ids=["looksam", "fsam", "wsam", "gsam"],
)
def test_resume_is_bit_exact(build):
    batches = _batches(7)
    full, _, _ = _run(build, batches=batches)

    model = _model(0)
    opt = build(model)
    for x, y in batches[:4]:
        opt.step(_closure(model, x, y))
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2 = _model(5)  # different weights, overwritten by the load
    opt2 = build(model2)
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    assert opt2.steps == 4
    for x, y in batches[4:]:
        opt2.step(_closure(model2, x, y))
    _assert_bitwise(full, model2)


# ---------------------------------------------------------------------- two-step API
@pytest.mark.parametrize(
    "build",
    [
        lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
        lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
        lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, gamma=0.7, decouple=False,
                       lr=LR),
        lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
    ],
    ids=["gsam", "wsam", "wsam_coupled", "fsam"],
)
def test_two_step_api_equals_step(build):
    ref, _, _ = _run(build)
    model = _model(0)
    opt = build(model)
    for x, y in _batches():
        F.cross_entropy(model(x), y).backward()
        assert opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    _assert_bitwise(ref, model)


# ---------------------------------------------------------------------- skipped steps
@pytest.mark.parametrize(
    "build",
    [
        lambda m: GSAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
        lambda m: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
        lambda m: LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=3, lr=LR, momentum=0.9),
        lambda m: FriendlySAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9),
    ],
    ids=["gsam", "wsam", "looksam", "fsam"],
)
@pytest.mark.parametrize("nan_at", [0, 4])
def test_nonfinite_step_leaves_parameters_and_state_untouched(build, nan_at):
    batches = _batches()
    model = _model(0)
    opt = build(model)
    for t, (x, y) in enumerate(batches):
        if t == nan_at:
            before = _params(model)
            state = copy.deepcopy(opt.state_dict())
            bad = x.clone()
            bad[0, 0] = float("nan")
            assert opt.step(_closure(model, bad, y)) is None
            for p, p0 in zip(model.parameters(), before):
                assert torch.equal(p, p0)
            after = opt.state_dict()
            assert after["state"].keys() == state["state"].keys()
            for k, s in state["state"].items():
                for name, v in s.items():
                    assert torch.equal(after["state"][k][name], v), name
            assert opt.skipped_steps == 1
            continue
        opt.step(_closure(model, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------- refused settings
@pytest.mark.parametrize(
    "build, match",
    [
        (lambda p: GSAM(p, torch.optim.SGD, alpha=float("inf"), lr=LR), "alpha"),
        (lambda p: GSAM(p, torch.optim.SGD, rho=float("nan"), lr=LR), "rho"),
        (lambda p: WSAM(p, torch.optim.SGD, gamma=1.0, lr=LR), "gamma"),
        (lambda p: WSAM(p, torch.optim.SGD, gamma=-0.1, lr=LR), "gamma"),
        (lambda p: WSAM(p, torch.optim.SGD, rho=float("inf"), lr=LR), "rho"),
        (lambda p: LookSAM(p, torch.optim.SGD, k=0, lr=LR), "k"),
        (lambda p: LookSAM(p, torch.optim.SGD, alpha=float("nan"), lr=LR), "alpha"),
        (lambda p: FriendlySAM(p, torch.optim.SGD, lmbda=1.5, lr=LR), "lmbda"),
        (lambda p: FriendlySAM(p, torch.optim.SGD, sigma=float("inf"), lr=LR), "sigma"),
        (lambda p: FriendlySAM(p, torch.optim.SGD, lr=float("inf")), "lr"),
    ],
)
def test_bad_settings_refused_with_the_name(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build(_model(0).parameters())


def test_wsam_bool_options_checked():
    with pytest.raises(TypeError, match="decouple"):
        WSAM(_model(0).parameters(), torch.optim.SGD, decouple="yes", lr=LR)
    with pytest.raises(TypeError, match="layerwise"):
        LookSAM(_model(0).parameters(), torch.optim.SGD, layerwise=1, lr=LR)


class _OverflowingScaler(torch.amp.GradScaler):
    """A GradScaler whose ``step`` finds an overflow (as when the re-scaled descent gradient
    overflows although every pass was finite): it skips the base step."""

    def step(self, optimizer, *args, **kwargs):
        return None


@pytest.mark.parametrize(
    "build",
    [
        lambda m, s: WSAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR, grad_scaler=s),
        lambda m, s: LookSAM(m.parameters(), torch.optim.SGD, rho=RHO, k=2, lr=LR,
                             grad_scaler=s),
        lambda m, s: FriendlySAM(m.parameters(), torch.optim.SGD, rho=RHO, lr=LR,
                                 grad_scaler=s),
    ],
    ids=["wsam", "looksam", "fsam"],
)
def test_a_step_the_grad_scaler_skips_writes_no_method_state(build):
    """WSAM's decoupled term and LookSAM's/FriendlySAM's state follow the base step: when the
    scaler skips it internally, neither is applied and the step counts as skipped."""
    model = _model(0)
    scaler = _OverflowingScaler("cpu", init_scale=4.0)
    opt = build(model, scaler)
    before = _params(model)
    (x, y), = _batches(1)

    def closure():
        loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        return loss

    assert opt.step(closure) is None
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p, p0)
    assert not any(opt.state[p] for p in model.parameters())
    assert opt.skipped_steps == 1 and opt.steps == 1
