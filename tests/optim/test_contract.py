"""The optimizer contract (docs/optim.md), checked for every optimizer in tests/optim/_registry.py.

A new sharpness-aware optimizer joins every test here with one line in the registry.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatlab.optim import LinearWarmup, NonFiniteStep
from tests.optim._registry import REGISTRY, step

ENTRIES = {e.name: e for e in REGISTRY}
IDS = list(ENTRIES)
DOCUMENTED_CLOSURE_CALLS = {
    "sam": 2, "asam": 2, "usam": 2, "gam_fd": 4, "gam_exact": 2, "samgam": 3,
    "dgsam": 2, "sagm": 2,  # with one domain
    "gsam": 2, "wsam": 2, "wsam_coupled": 2, "looksam": 2, "fsam": 2,
}
BASES = {
    "sgd_nesterov_wd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                          "weight_decay": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 1e-2}),
}


def make_problem(seed: int = 0, bn: bool = True, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    norm = [nn.BatchNorm1d(16)] if bn else []
    layers = [nn.Linear(5, 16), *norm, nn.Tanh(), nn.Linear(16, 1)]
    model = nn.Sequential(*layers).to(dtype)
    x = torch.randn(32, 5, dtype=dtype)
    y = torch.randn(32, 1, dtype=dtype)
    return model, x, y


def make_closure(opt, model, x, y, counter=None):
    def closure(backward=torch.autograd.backward):
        if counter is not None:
            counter.append(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        backward(loss)
        return loss

    return closure


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def base_state(opt) -> list[torch.Tensor]:
    base = getattr(opt, "base", opt)
    out = []
    for group in base.param_groups:
        for p in group["params"]:
            for v in base.state[p].values():
                out.append(torch.as_tensor(v))
    return out


@pytest.fixture
def deterministic():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old)


@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("name", IDS)
def test_zero_radius_is_base_bit_for_bit(name, base_name, deterministic):
    base_cls, base_kwargs = BASES[base_name]
    results = []
    for wrapped in (False, True):
        model, x, y = make_problem()
        if wrapped:
            opt = ENTRIES[name].build(model.parameters(), base_cls, zero=True, **base_kwargs)
        else:
            opt = base_cls(model.parameters(), **base_kwargs)
        closure = make_closure(opt, model, x, y)
        for _ in range(20):
            step(opt, closure) if wrapped else opt.step(closure)
        results.append((model.state_dict(), base_state(opt)))
    (sd0, st0), (sd1, st1) = results
    assert same_tensors(sd0, sd1)  # parameters and BatchNorm buffers
    assert len(st0) == len(st1) > 0
    assert all(torch.equal(a, b) for a, b in zip(st0, st1))


@pytest.mark.parametrize("name", IDS)
def test_closure_calls_and_returned_loss(name):
    model, x, y = make_problem()
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1)
    calls: list[int] = []
    closure = make_closure(opt, model, x, y, calls)
    for _ in range(3):
        with torch.no_grad():
            expected = nn.functional.mse_loss(copy.deepcopy(model)(x), y)
        calls.clear()
        loss = step(opt, closure)
        assert len(calls) == opt.closure_calls == DOCUMENTED_CLOSURE_CALLS[name]
        torch.testing.assert_close(loss.detach(), expected)  # loss at the unperturbed point


@pytest.mark.parametrize("name", IDS)
def test_resume_continues_bit_for_bit(name, deterministic):
    def build(model):
        kwargs = {"lr": 0.05, "momentum": 0.9}
        opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, **kwargs)
        opt._schedules["rho"] = LinearWarmup(opt.radius("rho"), warmup_steps=15)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        return opt, sched

    model, x, y = make_problem()
    opt, sched = build(model)
    for i in range(20):
        step(opt, make_closure(opt, model, x, y))
        sched.step()
        if i == 9:
            saved = copy.deepcopy(
                {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
            )
    straight = model.state_dict()

    model2, _, _ = make_problem(seed=1)  # different weights: everything must come from the file
    opt2, sched2 = build(model2)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups is opt2.base.param_groups
    assert opt2.steps == 10
    for _ in range(10):
        step(opt2, make_closure(opt2, model2, x, y))
        sched2.step()
    assert same_tensors(straight, model2.state_dict())


@pytest.mark.parametrize("name", IDS)
def test_state_dict_holds_base_momentum_and_wrapper_state(name):
    model, x, y = make_problem()
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    step(opt, make_closure(opt, model, x, y))
    sd = opt.state_dict()
    assert sd["flatlab"] == {"steps": 1, "skipped_steps": 0}
    assert len(sd["state"]) == len(list(model.parameters()))
    assert all("momentum_buffer" in s for s in sd["state"].values())


@pytest.mark.parametrize("name", IDS)
def test_lr_scheduler_attaches_to_the_wrapper(name):
    model, _, _ = make_problem()
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5**t)
    assert opt.param_groups is opt.base.param_groups
    step(opt, make_closure(opt, model, *make_problem()[1:]))
    sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("name", IDS)
def test_zero_gradient_gives_a_finite_step(name):
    model, x, _ = make_problem(bn=False)
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1)
    before = copy.deepcopy(model.state_dict())

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = (model(x) * 0.0).sum()
        backward(loss)
        return loss

    step(opt, closure)
    assert opt.skipped_steps == 0
    assert same_tensors(before, model.state_dict())  # zero gradient, zero step, no NaN


def _corrupting_closure(opt, model, x, y, bad_call: int, kind: str):
    calls: list[int] = []

    def closure(backward=torch.autograd.backward):
        calls.append(1)
        opt.zero_grad()
        inputs = x.clone()
        if kind == "nan_loss" and len(calls) == bad_call:
            inputs[0, 0] = float("nan")
        loss = nn.functional.mse_loss(model(inputs), y)
        backward(loss)
        if kind == "inf_grad" and len(calls) == bad_call:
            with torch.no_grad():
                next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    return closure


@pytest.mark.parametrize("kind", ["nan_loss", "inf_grad"])
@pytest.mark.parametrize("name", IDS)
def test_non_finite_skips_and_counts(name, kind):
    model, x, y = make_problem()
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    step(opt, make_closure(opt, model, x, y))  # momentum state exists
    for bad_call in range(1, opt.closure_calls + 1):
        if kind == "nan_loss" and bad_call > 1:
            continue  # BatchNorm spreads the NaN input into every gradient of pass 1 only
        model_before = copy.deepcopy(model.state_dict())
        state_before = [t.clone() for t in base_state(opt)]
        skipped = opt.skipped_steps
        loss = step(opt, _corrupting_closure(opt, model, x, y, bad_call, kind))
        assert loss is None
        assert opt.skipped_steps == skipped + 1
        after = model.state_dict()
        for k in model_before:
            if "running" not in k and "num_batches" not in k:  # pass 1 may update BN as usual
                assert torch.equal(model_before[k], after[k]), (bad_call, k)
        assert all(torch.equal(a, b) for a, b in zip(state_before, base_state(opt)))
    step(opt, make_closure(opt, model, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", IDS)
def test_non_finite_raises_when_asked(name):
    model, x, y = make_problem()
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1, on_nonfinite="raise")
    with pytest.raises(NonFiniteStep, match="non-finite"):
        step(opt, _corrupting_closure(opt, model, x, y, 1, "inf_grad"))


@pytest.mark.parametrize("name", IDS)
def test_batchnorm_statistics_change_once_per_step(name):
    model, x, y = make_problem()
    bn = model[1]
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1)
    for t in range(3):
        reference = copy.deepcopy(model)
        reference(x)  # one training-mode forward at the unperturbed point
        step(opt, make_closure(opt, model, x, y))
        assert int(bn.num_batches_tracked) == t + 1
        assert torch.equal(bn.running_mean, reference[1].running_mean)
        assert torch.equal(bn.running_var, reference[1].running_var)


@pytest.mark.parametrize("name", IDS)
def test_base_instance_equals_class_and_kwargs(name, deterministic):
    finals = []
    for as_instance in (False, True):
        model, x, y = make_problem()
        if as_instance:
            base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
            opt = ENTRIES[name].build(None, base)
        else:
            opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        for _ in range(3):
            step(opt, make_closure(opt, model, x, y))
        finals.append(model.state_dict())
    assert same_tensors(*finals)


@pytest.mark.parametrize("name", IDS)
def test_gradient_accumulation_through_the_closure(name):
    finals = []
    for micro in (1, 2):
        model, x, y = make_problem(bn=False, dtype=torch.float64)
        opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.1)

        def closure(backward=torch.autograd.backward, opt=opt, model=model, x=x, y=y, micro=micro):
            opt.zero_grad()
            total = 0.0
            for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
                loss = nn.functional.mse_loss(model(xb), yb) / micro
                backward(loss)  # accumulates into p.grad
                total = total + loss.detach()
            return total

        for _ in range(3):
            step(opt, closure)
        finals.append(model.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", IDS)
def test_bf16_autocast_trains(name):
    model, x, y = make_problem(bn=False)
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.05)

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        backward(loss)
        return loss

    first = step(opt, closure).item()
    for _ in range(30):
        last = step(opt, closure).item()
    assert opt.skipped_steps == 0 and last == last and last < first


@pytest.mark.parametrize("name", IDS)
def test_fp16_grad_scaler_trains_and_skips_overflow(name):
    model, x, y = make_problem(bn=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # overflows fp16 at first
    opt = ENTRIES[name].build(model.parameters(), torch.optim.SGD, lr=0.05, grad_scaler=scaler)

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        backward(scaler.scale(loss))
        return loss

    before = copy.deepcopy(model.state_dict())
    first = float(step(opt, closure) or nan_loss(model, x, y))
    scaler.update()
    assert opt.skipped_steps == 1 and scaler.get_scale() == 2.0**39
    assert same_tensors(before, model.state_dict())
    for _ in range(40):
        step(opt, closure)
        scaler.update()
    last = float(nn.functional.mse_loss(model(x), y))
    assert scaler.get_scale() < 2.0**32 and last < first
    assert all(torch.isfinite(p).all() for p in model.parameters())


def nan_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))
