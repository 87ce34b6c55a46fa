"""The shell itself: per-domain subclasses, old checkpoints, instance bases."""

from __future__ import annotations

import copy

import pytest
import torch

from flatlab.optim import SAM, SharpnessAware


class MeanOfDomains(SharpnessAware):
    """Toy per-domain method: the descent gradient is the mean of the domain gradients."""

    per_domain = True

    def __init__(self, params, base, **kwargs):
        super().__init__(params, base, radii={}, **kwargs)

    def _closure_calls(self):
        return 2

    def _descent(self, ctx, closures):
        total = None
        for i, closure in enumerate(closures):
            loss = ctx.gradient(closure, first=i == 0)
            ctx.finite(loss)
            if total is None:
                total = [g.clone() for g in ctx.grads()]
            else:
                torch._foreach_add_(total, ctx.grads())
        torch._foreach_div_(total, len(closures))
        ctx.set_grads(total)
        return loss


def test_per_domain_subclass_plugs_into_the_shell():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = MeanOfDomains([w], torch.optim.SGD, lr=0.5)
    targets = [torch.tensor([0.0, 0.0]), torch.tensor([2.0, 2.0])]

    def make(t):
        def closure(backward=torch.autograd.backward):
            opt.zero_grad()
            loss = 0.5 * ((w - t) ** 2).sum()
            backward(loss)
            return loss

        return closure

    opt.step([make(t) for t in targets])
    # mean gradient = w - mean(t) = [0, -3]; w <- w - 0.5 [0, -3]
    torch.testing.assert_close(w.detach(), torch.tensor([1.0, -0.5]))
    with pytest.raises(TypeError, match="sequence of closures"):
        opt.step(make(targets[0]))


def test_checkpoint_without_wrapper_state_loads():
    p = torch.nn.Parameter(torch.ones(2))
    base = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(2)
    base.step()
    opt = SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.load_state_dict(base.state_dict())  # a plain torch checkpoint: no "flatlab" key
    assert opt.steps == 0 and opt.skipped_steps == 0
    assert len(opt.state) == 1 and opt.param_groups is opt.base.param_groups


def test_an_error_in_the_second_pass_leaves_the_parameters_unperturbed():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = SAM([w], torch.optim.SGD, rho=0.5, lr=0.1)
    calls = []

    def closure(backward=torch.autograd.backward):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        opt.zero_grad()
        loss = (w**2).sum()
        backward(loss)
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


def test_compiled_model_batchnorm_once_per_step_when_model_is_given():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    compiled = torch.compile(net, backend="eager")  # compiled code skips Python forwards
    x, y = torch.randn(16, 5), torch.randn(16, 1)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=compiled)

    def closure(backward=torch.autograd.backward):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(compiled(x), y)
        backward(loss)
        return loss

    for t in range(3):
        reference = copy.deepcopy(net)
        reference(x)
        opt.step(closure)
        assert int(net[1].num_batches_tracked) == t + 1
        assert torch.equal(net[1].running_mean, reference[1].running_mean)
