"""Never a silently wrong step (issue 13, section 1 and 2): gradient accumulation, closures that
never zero gradients, per-group radii, non-finite hyperparameters, closure mistakes, repeated
skips, no patching of torch, two threads, torch.compile, and the two-step API."""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

from flatlab.optim import DGSAM, GAM, SAM, SAMGAM, ClosureError, LinearWarmup

from ._registry import REGISTRY, step

F = nn.functional


def linear_problem(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g,
                                                                           dtype=torch.float64)
    torch.manual_seed(seed)
    return nn.Linear(3, 1).double(), x, y


# ------------------------------------------------------------------ gradient accumulation
def sam_reference_with_carried(w, b, batches, rho, lr):
    """Hand-computed SAM step under accumulation over ``batches`` (each loss divided by their
    count, as Lightning does): the earlier micro-batches' gradient c enters as a fixed term,
    the ascent uses c + g_last(theta), the descent c + g_last(theta + e)."""
    k = len(batches)

    def grad(wv, bv, x, y):
        wv, bv = wv.clone().requires_grad_(), bv.clone().requires_grad_()
        loss = F.mse_loss(F.linear(x, wv, bv), y) / k
        return torch.autograd.grad(loss, [wv, bv])

    carried = [torch.zeros_like(w), torch.zeros_like(b)]
    for x, y in batches[:-1]:
        carried = [c + g for c, g in zip(carried, grad(w, b, x, y))]
    own = grad(w, b, *batches[-1])
    g = [c + o for c, o in zip(carried, own)]
    norm = torch.cat([t.flatten() for t in g]).norm()
    e = [rho * t / (norm + 1e-12) for t in g]
    own_p = grad(w + e[0], b + e[1], *batches[-1])
    d = [c + o for c, o in zip(carried, own_p)]
    return w - lr * d[0], b - lr * d[1]


def test_lightning_accumulate_grad_batches_matches_hand_computed_reference():
    L = pytest.importorskip("lightning")
    model0, x, y = linear_problem(n=8)
    w0, b0 = model0.weight.detach().clone(), model0.bias.detach().clone()
    rho, lr = 0.1, 0.5

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(3, 1).double()
            with torch.no_grad():
                self.net.weight.copy_(w0)
                self.net.bias.copy_(b0)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return SAM(self.net.parameters(), torch.optim.SGD, rho=rho, lr=lr)

    module = Module()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=2,
        enable_progress_bar=False, logger=False, enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    trainer.fit(module, loader)
    w1, b1 = sam_reference_with_carried(w0, b0, [(x[:4], y[:4]), (x[4:], y[4:])], rho, lr)
    torch.testing.assert_close(module.net.weight.detach(), w1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.net.bias.detach(), b1, rtol=1e-12, atol=1e-12)
    # the contaminated step of the old code (perturb with g1+g2, descend with g1+g2+g2(theta+e))
    # is far from it
    assert not torch.allclose(module.net.weight.detach(), w0, atol=1e-6)


def test_manual_accumulation_before_step_matches_reference():
    model, x, y = linear_problem(seed=3)
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3)
    (F.mse_loss(model(x[:4]), y[:4]) / 2).backward()  # micro-batch 1, outside the step

    def closure():  # micro-batch 2; does not zero (it accumulates)
        loss = F.mse_loss(model(x[4:]), y[4:]) / 2
        loss.backward()
        return loss

    opt.step(closure)
    w1, b1 = sam_reference_with_carried(w0, b0, [(x[:4], y[:4]), (x[4:], y[4:])], 0.2, 0.3)
    torch.testing.assert_close(model.weight.detach(), w1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), b1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if not e.cls.per_domain],
                         ids=lambda e: e.name)
def test_closure_that_never_zeroes_gradients_equals_one_that_does(entry):
    finals = []
    for zero in (True, False):
        model, x, y = linear_problem(seed=1)
        opt = entry.build(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)

        def closure(backward=torch.autograd.backward, opt=opt, model=model, zero=zero, x=x, y=y):
            if zero:
                opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            backward(loss)
            return loss

        for _ in range(4):
            opt.step(closure)
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_per_domain_methods_refuse_carried_gradients():
    model, x, y = linear_problem()
    opt = DGSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    F.mse_loss(model(x), y).backward()

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match="gradient accumulation"):
        opt.step([closure])


# ------------------------------------------------------------------ per-group radii
def two_group_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1)).double()
    no_decay = [p for n, p in model.named_parameters() if p.ndim == 1]
    rest = [p for n, p in model.named_parameters() if p.ndim > 1]
    return model, no_decay, rest


RADII = {
    "sam": (SAM, {"rho": 0.1}, ("rho",)),
    "gam_fd": (GAM, {"rho": 0.1, "fd_rho": 0.02}, ("rho", "fd_rho")),
    "samgam": (SAMGAM, {"rho": 0.1, "sam_rho": 0.05}, ("rho", "sam_rho")),
    "dgsam": (DGSAM, {"rho": 0.1, "combine": "perturbed_mean"}, ("rho",)),
}


@pytest.mark.parametrize("name", sorted(RADII))
def test_zero_radius_group_is_never_perturbed(name):
    cls, kwargs, names = RADII[name]
    model, no_decay, rest = two_group_model()
    groups = [{"params": no_decay, **{n: 0.0 for n in names}}, {"params": rest}]
    opt = cls(groups, torch.optim.SGD, lr=0.1, **kwargs)
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    start = [p.detach().clone() for p in no_decay]
    seen_rest = []

    def closure(backward=torch.autograd.backward):
        for p, s in zip(no_decay, start):
            assert torch.equal(p.detach(), s)  # never moved inside the step
        seen_rest.append([p.detach().clone() for p in rest])
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        backward(loss)
        return loss

    step(opt, closure)
    assert any(not torch.equal(a, b) for a, b in zip(seen_rest[0], seen_rest[1]))
    assert opt.radius(names[0], group=0) == 0.0 and opt.radius(names[0], group=1) > 0


@pytest.mark.parametrize("name", sorted(RADII))
def test_all_groups_at_zero_equal_the_base_bit_for_bit(name):
    cls, kwargs, names = RADII[name]
    extra = {"gamma": 0.0, "alpha": 1.0} if name == "gam_fd" else {}
    finals = []
    for wrapped in (True, False):
        model, no_decay, rest = two_group_model()
        groups = [{"params": no_decay, "weight_decay": 0.0, **{n: 0.0 for n in names}},
                  {"params": rest, "weight_decay": 1e-2, **{n: 0.0 for n in names}}]
        opt = (cls(groups, torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs, **extra) if wrapped
               else torch.optim.SGD(groups, lr=0.1, momentum=0.9))
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 3, generator=g, dtype=torch.float64)
        y = torch.randn(16, 1, generator=g, dtype=torch.float64)

        def closure(backward=torch.autograd.backward, opt=opt, model=model, x=x, y=y):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            backward(loss)
            return loss

        for _ in range(3):
            step(opt, closure) if wrapped else opt.step(closure)
        finals.append(model.state_dict())
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_per_group_schedule_and_bad_group_radius():
    model, no_decay, rest = two_group_model()
    opt = SAM([{"params": no_decay, "rho": LinearWarmup(0.2, warmup_steps=2)}, {"params": rest}],
              torch.optim.SGD, rho=0.05, lr=0.1)
    assert opt.radius("rho", group=0) == 0.0 and opt.radius("rho", group=1) == 0.05
    with pytest.raises(ValueError, match=r"param_groups\[0\] rho must be finite, got inf"):
        SAM([{"params": no_decay, "rho": float("inf")}, {"params": rest}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho must be >= 0, got -1.0"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(1))], "rho": -1.0})


# ------------------------------------------------------------------ non-finite settings
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: SAM(p, torch.optim.SGD, rho=float("inf"), lr=0.1),
         "rho must be finite, got inf"),
        (lambda p: SAM(p, torch.optim.SGD, rho=float("nan"), lr=0.1), "rho must not be NaN"),
        (lambda p: SAM(p, torch.optim.SGD, lr=float("inf")), "lr must be finite, got inf"),
        (lambda p: SAM(p, torch.optim.SGD, lr=0.1, momentum=float("nan")),
         "momentum must be finite, got nan"),
        (lambda p: SAM(p, torch.optim.Adam, lr=0.1, betas=(0.9, float("inf"))),
         r"betas must be finite, got \(0.9, inf\)"),
        (lambda p: SAM(p, torch.optim.SGD(p, lr=float("inf"))), "lr must be finite, got inf"),
        (lambda p: GAM(p, torch.optim.SGD, fd_rho=float("inf"), lr=0.1),
         "fd_rho must be finite, got inf"),
        (lambda p: GAM(p, torch.optim.SGD, gamma=float("inf"), lr=0.1),
         "gamma must be finite, got inf"),
        (lambda p: DGSAM(p, torch.optim.SGD, rho=float("inf"), lr=0.1),
         "rho must be finite, got inf"),
        (lambda p: SAM(p, torch.optim.SGD, rho=LinearWarmup(float("inf"), 3), lr=0.1),
         "value must be finite, got inf"),
        (lambda p: SAM(p, torch.optim.SGD, lr=0.1, clip_grad_norm=float("inf")),
         "clip_grad_norm must be finite, got inf"),
    ],
)
def test_non_finite_hyperparameters_are_refused_with_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make([nn.Parameter(torch.ones(2))])


# ------------------------------------------------------------------ closure mistakes
def _mistakes(model, x, y, opt):
    def no_backward(backward=None):
        opt.zero_grad()
        return F.mse_loss(model(x), y)

    def under_no_grad(backward=None):
        opt.zero_grad()
        with torch.no_grad():
            loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    def unreduced(backward=None):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y, reduction="none")
        loss.backward()
        return loss

    def unreduced_returned(backward=None):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y, reduction="none")
        loss.mean().backward()
        return loss

    def returns_none(backward=None):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()

    return [
        (no_backward, "ran no backward"),
        (under_no_grad, r"torch.no_grad\(\)"),
        (unreduced, "unreduced loss"),
        (unreduced_returned, r"unreduced loss of shape \(8, 1\)"),
        (returns_none, "returned None"),
    ]


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_closure_mistakes_say_which_and_do_not_advance(entry):
    model, x, y = linear_problem()
    opt = entry.build(model.parameters(), torch.optim.SGD, lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    for closure, match in _mistakes(model, x, y, opt):
        with pytest.raises(ClosureError, match=match):
            step(opt, closure)
        assert opt.steps == 0 and opt.skipped_steps == 0
        for p, b in zip(model.parameters(), before):
            assert torch.equal(p.detach(), b)


def test_repeated_skips_warn_once_with_the_count():
    p = nn.Parameter(torch.ones(2))
    opt = SAM([p], torch.optim.SGD, lr=0.1, warn_after_skips=3)

    def bad():
        opt.zero_grad()
        loss = (p * float("nan")).sum()
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            assert opt.step(bad) is None
    messages = [str(w.message) for w in caught if "in a row" in str(w.message)]
    assert messages == ["SAM skipped 3 steps in a row for non-finite losses or gradients (3 "
                        "skipped in total); check the learning rate, the radii and the data"]
    assert opt.skipped_steps == 6 and opt.steps == 6


def test_step_returns_a_detached_loss():
    model, x, y = linear_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert not loss.requires_grad and loss.grad_fn is None


# ------------------------------------------------------------------ no global patching
def _norm_classes():
    out, stack = [], [nn.modules.batchnorm._NormBase]
    while stack:
        cls = stack.pop()
        out.append(cls)
        stack.extend(cls.__subclasses__())
    return out


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_torch_is_never_patched_during_a_step(entry):
    originals = (torch.autograd.backward, torch.Tensor.backward,
                 {c: c.__dict__.get("forward") for c in _norm_classes()})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = entry.build(model.parameters(), torch.optim.SGD, lr=0.1)
    checked = []

    def closure(backward=torch.autograd.backward):
        assert torch.autograd.backward is originals[0]
        assert torch.Tensor.backward is originals[1]
        assert {c: c.__dict__.get("forward") for c in _norm_classes()} == originals[2]
        checked.append(1)
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        backward(loss)
        return loss

    for _ in range(2):
        step(opt, closure)
    assert len(checked) >= 4


def _bn_run(seed):
    """A model, its SAM and a closure, built up front (torch's global RNG is process-wide)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 1, generator=g)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    def train(steps=20):
        for _ in range(steps):
            opt.step(closure)
        return model.state_dict()

    return train


def test_two_optimizers_in_two_threads_equal_sequential_runs():
    sequential = [_bn_run(0)(), _bn_run(1)()]
    runs = [_bn_run(0), _bn_run(1)]
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, runs[s]()))
               for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in (0, 1):
        for k, v in sequential[s].items():
            assert torch.equal(results[s][k], v), (s, k)
        assert int(results[s]["1.num_batches_tracked"]) == 20


# ------------------------------------------------------------------ torch.compile
def test_compiled_model_updates_batchnorm_once_per_step_without_model_argument():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = SAM(compiled.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(compiled(x), y)
        loss.backward()
        return loss

    for k in range(3):
        expected = model[1].running_mean * 0.9 + 0.1 * model[0](x).detach().mean(0)
        opt.step(closure)
        assert int(model[1].num_batches_tracked) == k + 1
        torch.testing.assert_close(model[1].running_mean, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [GAM, SAMGAM])
def test_exact_gam_refuses_a_compiled_model_clearly(cls):
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)),
                          backend="aot_eager")
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt = cls(model.parameters(), torch.optim.SGD, hvp="exact", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        backward(loss)
        return loss

    for _ in range(2):  # the second step too (after discovery, fully compiled)
        with pytest.raises(RuntimeError, match="needs double backward.*finite_difference"):
            opt.step(closure)
    assert opt.steps == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


def test_exact_gam_refuses_a_closure_without_the_backward_argument():
    model, x, y = linear_problem()
    opt = GAM(model.parameters(), torch.optim.SGD, hvp="exact", lr=0.1)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(TypeError, match=r"def closure\(backward=torch.autograd.backward\)"):
        opt.step(closure)
    assert opt.steps == 0


@pytest.mark.parametrize("cls", [GAM, SAMGAM])
def test_exact_gam_refuses_a_closure_that_ignores_its_backward(cls):
    """A closure that takes ``backward`` but calls ``loss.backward()`` keeps no graph: every
    Hessian-vector product would be zero and the step its base optimizer's, silently."""
    model, x, y = linear_problem()
    opt = cls(model.parameters(), torch.optim.SGD, hvp="exact", lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ClosureError, match=r"did not call the backward function it was given"):
        opt.step(closure)
    assert opt.steps == 0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b)


# ------------------------------------------------------------------ two-step API
@pytest.mark.parametrize("kwargs", [{"rho": 0.1}, {"rho": 0.5, "adaptive": True},
                                    {"rho": 0.1, "normalize": False}])
def test_two_step_api_equals_step_with_closure(kwargs):
    finals = []
    for two_step in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g)
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model,
                  **kwargs)
        for _ in range(4):
            if two_step:
                F.mse_loss(model(x), y).backward()
                opt.first_step(zero_grad=True)
                F.mse_loss(model(x), y).backward()
                opt.second_step(zero_grad=True)
            else:
                def closure(opt=opt, model=model, x=x, y=y):
                    opt.zero_grad()
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    return loss

                opt.step(closure)
        finals.append(model.state_dict())
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k
    assert int(model[1].num_batches_tracked) == 4


def test_two_step_api_misuse_is_refused():
    model, x, y = linear_problem()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()
    F.mse_loss(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()


@pytest.mark.parametrize("when", ["built", "loaded"])
def test_gradients_present_when_the_optimizer_is_built_or_loaded_are_stale_not_carried(when):
    """Switching optimizers (SGD warm-up, then SAM), or resuming in a process whose
    parameters still hold the last step's gradients, must not add them to the next step."""
    finals = []
    for leftover in (False, True):
        model, x, y = linear_problem(seed=5)
        if when == "loaded":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
            saved = opt.state_dict()
        if leftover:
            F.mse_loss(model(x[:3]), y[:3]).backward()  # e.g. the last step of another optimizer
        if when == "built":
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
        else:
            opt.load_state_dict(saved)

        def closure(model=model, x=x, y=y):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        finals.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)
