"""Hessian / GGN operator: exact products, batch weighting, subsets, modes, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from flatlab.curvature import ggn_operator, hessian_operator
from flatlab.curvature._model import flatten, unflatten

from .conftest import concat, dense_hessian, make_batches, make_mlp, problem

CE = nn.functional.cross_entropy


@pytest.mark.parametrize("method", ["func", "forward_ad", "double_backward"])
def test_products_match_dense_hessian(mlp_problem, method):
    model, data, H = mlp_problem
    op = hessian_operator(model, CE, data, method=method)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], generator=g, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
    V = torch.randn(op.shape[0], 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op @ V, H @ V, rtol=0, atol=1e-10)
    assert op.n_matvecs == 4
    assert op.method == method


def test_unequal_batches_equal_concatenation():
    model, data, _ = problem("tanh")
    assert len({b[0].shape[0] for b in data}) == 3
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    split = hessian_operator(model, CE, data).matvec(v)
    whole = hessian_operator(model, CE, concat(data)).matvec(v)
    torch.testing.assert_close(split, whole, rtol=0, atol=1e-12)
    # a DataLoader over the same examples gives the same operator
    dataset = torch.utils.data.TensorDataset(*concat(data))
    loader = torch.utils.data.DataLoader(dataset, batch_size=9)
    torch.testing.assert_close(hessian_operator(model, CE, loader).matvec(v), whole, rtol=0,
                               atol=1e-12)
    shuffled = torch.utils.data.DataLoader(dataset, batch_size=9, shuffle=True)
    with pytest.raises(RuntimeError, match="check_deterministic=False"):
        hessian_operator(model, CE, shuffled)
    hessian_operator(model, CE, shuffled, check_deterministic=False)  # allowed when asked


def test_parameter_subset_is_principal_block():
    model, data, H = problem("relu")
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[:2])  # block of the second Linear layer
    stop = start + sizes[2] + sizes[3]
    block = H[start:stop, start:stop]
    V = torch.randn(stop - start, 2, dtype=torch.float64)
    for params in (model[2], [model[2].weight, model[2].bias], names[2:4]):
        op = hessian_operator(model, CE, data, params=params)
        assert op.shape == (stop - start, stop - start)
        torch.testing.assert_close(op @ V, block @ V, rtol=0, atol=1e-10)
    last = hessian_operator(model, CE, data, params=[model[4].bias])  # 4 x 4: dense is cheap
    torch.testing.assert_close(last.to_dense(), H[-4:, -4:], rtol=0, atol=1e-10)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse_loss"])
def test_ggn_matches_dense_jacobian_formula(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    CE = getattr(nn.functional, loss)  # mse_loss: torch's own, whose forward-mode backward fails
    y = torch.randint(0, 2, (6,)) if loss == "cross_entropy" else torch.randn(
        6, 2, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    like = [p.detach() for p in model.parameters()]

    def net(theta):
        return functional_call(model, dict(zip(names, unflatten(theta, like))), (x,))

    theta = flatten(like)
    J = jacrev(net)(theta).reshape(-1, theta.numel())  # (6*2, n)
    out = net(theta).detach()
    HL = torch.autograd.functional.hessian(lambda o: CE(o.view(6, 2), y), out.reshape(-1))
    G = J.T @ HL @ J
    op = ggn_operator(model, CE, (x, y))
    torch.testing.assert_close(op.to_dense(), G, rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(op.to_dense()).min() > -1e-12  # PSD for both losses


class _BNDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


def test_model_state_untouched_and_bn_dropout_deterministic():
    from flatlab.curvature import top_eigenvalues

    torch.manual_seed(0)
    model = _BNDrop().double()
    model.body[0].bias.requires_grad_(False)
    model.train()
    model.body[3].eval()  # a submodule with its own flag must get it back
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    model(x)  # give BN non-trivial running stats
    before = copy.deepcopy(model.state_dict())
    flags = [m.training for m in model.modules()]
    grads = [p.requires_grad for p in model.parameters()]
    first = top_eigenvalues(model, k=2, loss_fn=CE, data=(x, y))
    second = top_eigenvalues(model, k=2, loss_fn=CE, data=(x, y))
    torch.testing.assert_close(first.values, second.values, rtol=0, atol=0)
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_errors_are_clear():
    model = make_mlp("tanh")
    data = make_batches()
    with pytest.raises(ValueError, match="data is empty"):
        hessian_operator(model, CE, [])
    with pytest.raises(ValueError, match="empty batch"):
        hessian_operator(model, CE, (torch.zeros(0, 8, dtype=torch.float64),
                                     torch.zeros(0, dtype=torch.long)))
    def per_example(out, y):
        return nn.functional.cross_entropy(out, y, reduction="none")

    op = hessian_operator(model, per_example, data)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        op.matvec(torch.ones(op.shape[0], dtype=torch.float64))
    stranger = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"params\[0\] must be a parameter of the model"):
        hessian_operator(model, CE, data, params=[stranger])
    with pytest.raises(ValueError, match="must name a parameter"):
        hessian_operator(model, CE, data, params=["nope.weight"])
    with pytest.raises(ValueError, match="method must be one of"):
        hessian_operator(model, CE, data, method="magic")
    op = hessian_operator(model, CE, data)
    with pytest.raises(ValueError, match="vector must have shape"):
        op.matvec(torch.ones(3, dtype=torch.float64))


def test_float32_model_products_close_to_float64_truth():
    model, data, H = problem("tanh")
    model32 = copy.deepcopy(model).float()
    data32 = [(x.float(), y) for x, y in data]
    op = hessian_operator(model32, CE, data32)
    assert op.dtype == torch.float32
    v = torch.randn(op.shape[0], dtype=torch.float64)
    hv = op.matvec(v.float()).double()
    assert (hv - H @ v).norm() <= 1e-5 * (H @ v).norm()


def test_dense_helper_consistent_with_concat():
    model, data, H = problem("tanh")
    torch.testing.assert_close(dense_hessian(model, CE, concat(data)), H)


def test_eval_mode_false_keeps_train_mode_behaviour():
    torch.manual_seed(0)
    model = _BNDrop().double().train()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    live = hessian_operator(model, CE, (x, y), eval_mode=False)
    assert not torch.equal(live.matvec(v), live.matvec(v))  # dropout is on: random products
    assert model.training
    frozen = hessian_operator(model, CE, (x, y))
    assert torch.equal(frozen.matvec(v), frozen.matvec(v))
    running = model.body[1].running_mean.clone()
    live.matvec(v)  # train-mode BatchNorm must not update the model's running statistics
    assert torch.equal(model.body[1].running_mean, running)
