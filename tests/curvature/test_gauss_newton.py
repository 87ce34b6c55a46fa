"""The Gauss-Newton trace: exact against dense matrices, its linearity check, its refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.curvature import ggn_operator, hessian_operator, hessian_trace
from flatlab.curvature._progress import Meter
from flatlab.curvature.gauss_newton import (
    NotApplicable,
    ggn_trace,
    linear_blocks,
    nonlinear_tensors,
    plan,
)
from flatlab.curvature.hvp import as_operator
from flatlab.curvature.trace import PILOT_PROBES, _residual_block

CE = nn.functional.cross_entropy


def mlp(act: type[nn.Module] = nn.ReLU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), act(), nn.Linear(8, 8), act(),
                         nn.Linear(8, 4)).double()


def batches(n: int = 30, d: int = 5, classes: int = 4, sizes=(13, 17)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes))))


class TinyResNet(nn.Module):
    """conv, eval-mode BatchNorm, ReLU, a residual addition, max and average pooling."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = nn.functional.max_pool2d(h, 2)
        h = torch.relu(h + self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def dense_trace(model, loss_fn, data, params=None, kind="hessian") -> float:
    make = hessian_operator if kind == "hessian" else ggn_operator
    return float(torch.trace(make(model, loss_fn, data, params=params).to_dense()))


def test_a_relu_network_is_exact_on_unequal_batches():
    model, data = mlp(), batches()
    res = hessian_trace(model, CE, data, method="gauss_newton", progress=False)
    assert res.method == "gauss_newton" and res.converged and res.stderr == 0.0
    assert res.value == pytest.approx(dense_trace(model, CE, data), rel=1e-10, abs=1e-12)
    # cross-entropy's constant direction is skipped: 3 of 4 passes per batch
    assert res.n_matvecs == 2 * 3


def test_a_convolutional_residual_network_with_batchnorm_is_exact_and_untouched():
    torch.manual_seed(0)
    model = TinyResNet().double()
    with torch.no_grad():  # non-trivial running statistics, then eval mode
        model(torch.randn(16, 1, 6, 6, dtype=torch.float64))
    model.eval()
    model.bn1.train()  # a submodule's own flag must come back as it was
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in (5, 7)]
    assert nonlinear_tensors(model, data) == []
    res = hessian_trace(model, CE, data, method="gauss_newton", progress=False)
    assert res.stderr == 0.0
    assert res.value == pytest.approx(dense_trace(model, CE, data), rel=1e-10)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.bn1.training and not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_the_gauss_newton_trace_is_exact_for_any_network(act, loss):
    model, data = mlp(act), batches()
    if loss == "mse":
        data = [(x, nn.functional.one_hot(y, 4).double()) for x, y in data]
        def loss_fn(o, t):
            return ((o - t) ** 2).mean()
    else:
        loss_fn = CE
    res = ggn_trace(model, loss_fn, data)
    assert res.converged and res.examples == 30 and res.per_example.shape == (30,)
    assert res.value == pytest.approx(dense_trace(model, loss_fn, data, kind="ggn"), rel=1e-10)


def test_the_check_names_exactly_the_tensors_entering_nonlinearly():
    # tanh after layers 0 and 2: the outputs are affine in the last layer only
    assert nonlinear_tensors(mlp(nn.Tanh), batches()) == ["0.weight", "0.bias", "2.weight",
                                                           "2.bias"]
    assert nonlinear_tensors(mlp(nn.ReLU), batches()) == []

    class Reused(nn.Module):  # a weight used twice on one path is quadratic in it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    torch.manual_seed(0)
    # W relu(W x + b) + b: quadratic in W, affine in b
    assert nonlinear_tensors(Reused().double(), batches(d=4)) == ["lin.weight"]


class CustomLinear(nn.Module):
    """A linear layer that is not an ``nn.Linear``: its tensors are no exact Linear block."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        lin = nn.Linear(d_in, d_out)
        self.w, self.b = nn.Parameter(lin.weight.detach()), nn.Parameter(lin.bias.detach())

    def forward(self, x):
        return nn.functional.linear(x, self.w, self.b)


def test_a_tanh_mlp_is_exact_through_its_linear_blocks():
    model, data = mlp(nn.Tanh), batches()
    route = plan(model, CE, data)
    assert route.nonlinear == route.exact == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert route.residual == [] and route.passes == 4 + 8 + 8
    res = hessian_trace(model, CE, data, method="gauss_newton", progress=False)
    assert res.value == pytest.approx(dense_trace(model, CE, data), rel=1e-10)
    assert res.stderr == 0.0 and res.converged
    # per batch: 3 Gauss-Newton passes (the last layer), 8 + 8 for the two tanh layers
    assert res.n_matvecs == 2 * (3 + 16)
    # blocks that do not fit the probes stay in the residual (a wide MLP: no thousand passes)
    small = plan(model, CE, data, probes=19)
    assert small.exact == [] and small.residual == small.nonlinear and small.passes == 4
    assert plan(model, CE, data, probes=20, total=True).exact == route.exact  # 20 fit
    with pytest.raises(NotApplicable, match="no room for its residual's probes"):
        plan(model, CE, data, probes=11, total=True)  # 4 + 2 x 4 > 11 without the blocks
    with pytest.raises(NotApplicable, match="4 outputs per example"):
        plan(model, CE, data, probes=3, total=True)
    # and the blocks alone: ggn_trace(exact=) is tr G off them plus tr H_kk on them
    H = hessian_operator(model, CE, data).to_dense()
    G = ggn_operator(model, CE, data).to_dense()
    k = 5 * 8 + 8  # the first layer's coordinates come first
    want = float(H[:k, :k].trace() + G[k:, k:].trace())
    got = ggn_trace(model, CE, data, exact=["0.weight", "0.bias"]).value
    assert got == pytest.approx(want, rel=1e-10)


def test_a_tanh_network_estimates_the_residual_on_the_other_nonlinear_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(CustomLinear(5, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh(),
                          nn.Linear(8, 4)).double()
    data = batches()
    truth = dense_trace(model, CE, data)
    route = plan(model, CE, data)
    assert route.residual == ["0.w", "0.b"] and route.exact == ["2.weight", "2.bias"]
    # 80 + 16 = 96 residual coordinates: at 200 probes (400 products) its Hessian block is
    # taken exactly, from 96 unit columns, beside the Gauss-Newton trace of the rest
    exact = hessian_trace(model, CE, data, method="gauss_newton", probes=200, progress=False)
    assert exact.value == pytest.approx(truth, rel=1e-10) and exact.stderr == 0.0
    # per batch 3 + 8 passes, then one Hessian product per residual coordinate
    assert exact.n_matvecs == 2 * (3 + 8) + 96
    covered = 0
    for seed in range(10):
        r = hessian_trace(model, CE, data, method="gauss_newton", probes=40, seed=seed,
                          progress=False)
        # 80 products < 96: the pilot's 2 probes on each of the 2 tensors (8 products), then
        # the other 72 as probes of H_nn or R_nn, the pilot's samples kept
        assert r.converged and 0 < r.stderr < float("inf")
        assert len(r.samples) == 4 + 72 and r.n_matvecs == 2 * 11 + 80
        covered += abs(r.value - truth) <= 2 * r.stderr
    assert covered >= 8
    # "auto" at 40 products: 3 + 8 passes a batch leave (40 - 11) // 2 = 14 residual probes
    auto = hessian_trace(model, CE, data, probes=40, progress=False)
    assert auto.method == "gauss_newton" and auto.n_matvecs == 2 * 11 + 2 * 14
    fixed = hessian_trace(model, CE, data, method="gauss_newton", probes=14, progress=False)
    assert auto.value == fixed.value and auto.stderr == fixed.stderr > 0
    # the plan counts D = 4 outputs (CE's constant direction is skipped only when run):
    # at 19 products the blocks leave no room for 4 probes (4 + 8 + 2 x 4 > 19), so the
    # residual is all four nonlinear tensors (168 coordinates), with (19 - 4) // 2 = 7
    # probes: 14 products after the 3 passes of the two batches' 3 live directions; a pilot
    # per tensor (16 products) would take more than half of them, so it probes the whole
    # block: 2 probes (4 products), then 10
    small = hessian_trace(model, CE, data, probes=19, progress=False)
    assert small.method == "gauss_newton" and small.n_matvecs == 2 * 3 + 2 * 7
    assert len(small.samples) == 2 + 10
    # at 10 products not even that (4 + 2 x 4 > 10): XTrace
    assert hessian_trace(model, CE, data, probes=10, progress=False).method == "xtrace"


def test_the_residual_goes_to_the_block_less_variable_per_product():
    torch.manual_seed(0)
    n = 40
    a = torch.randn(n, n, dtype=torch.float64)
    H = (a + a.T) / 2
    small = torch.randn(n, n, dtype=torch.float64) * 1e-3
    b = torch.randn(n, 3, dtype=torch.float64) * 3
    # R = H - G: tiny (G close to H), or H plus a large coupling (a G of -b b^T)
    for R, want in (((small + small.T) / 2, "R"), (H + b @ b.T, "H")):
        which, est = _residual_block(as_operator(H), as_operator(R), 30, 0, 16,
                                     Meter("t", None, progress=False))
        assert which == want and est.converged and est.method == "hutchinson"
        # one group: the pilot's 2 probes (an H and an R product each), then 26 probes
        assert est.n_matvecs == 30 and len(est.samples) == PILOT_PROBES + 26
        target = float(R.trace()) if want == "R" else float(H.trace())
        assert abs(est.value - target) <= 4 * est.stderr
    # a block no larger than the products: exact, from n unit columns
    which, est = _residual_block(as_operator(H), as_operator(R), n, 0, 16,
                                 Meter("t", None, progress=False))
    assert which == "H" and est.value == pytest.approx(float(H.trace()), rel=1e-12)
    assert est.n_matvecs == n and est.stderr == 0.0
    # budgets: one in the pilot leaves the H samples done; one after it, fewer probes
    for budget, converged_stderr in ((3, float("inf")), (6, None)):
        meter = Meter("t", None, max_matvecs=budget, progress=False)
        which, est = _residual_block(as_operator(H), as_operator(R), 30, 0, 16, meter)
        assert not est.converged and est.n_matvecs == budget and est.value == est.value
        assert converged_stderr is None or est.stderr == converged_stderr


def test_coupled_tensors_are_probed_one_at_a_time():
    """Two tensors whose diagonal blocks are diagonal but which are coupled: probes of the
    whole block pay for the coupling, probes of one tensor at a time see none of it."""
    torch.manual_seed(0)
    sizes = [30, 20]
    d = torch.randn(50, dtype=torch.float64)
    C = torch.randn(30, 20, dtype=torch.float64)
    A = torch.diag(d)
    A[:30, 30:], A[30:, :30] = C, C.T
    R = A + torch.randn(50, 50, dtype=torch.float64).mT @ torch.randn(50, 50).double()
    R = (R + R.T) / 2  # R's blocks are all full: H per tensor wins
    for seed in range(3):
        meter = Meter("t", None, progress=False)
        which, est = _residual_block(as_operator(A), as_operator(R), 40, seed, 16, meter,
                                     sizes)
        # each tensor's probes give its trace exactly: the split is exact, stderr 0
        assert which == "H" and est.n_matvecs == 40 and est.converged
        assert est.value == pytest.approx(float(d.sum()), rel=1e-12)
        assert est.stderr == pytest.approx(0.0, abs=1e-9)
        assert len(est.samples) == 2 * PILOT_PROBES + 40 - 4 * PILOT_PROBES
    # a budget that ends among the per-tensor probes: each tensor keeps the probes done
    meter = Meter("t", None, max_matvecs=30, progress=False)
    which, est = _residual_block(as_operator(A), as_operator(R), 40, 0, 16, meter, sizes)
    assert not est.converged and est.n_matvecs == 30
    assert est.value == pytest.approx(float(d.sum()), rel=1e-12)
    # the same matrix as one group (no sizes): probes of the whole block, not exact
    which, est = _residual_block(as_operator(A), as_operator(R), 40, 0, 16,
                                 Meter("t", None, progress=False))
    assert which == "H" and est.stderr > 0.1
    assert abs(est.value - float(d.sum())) <= 4 * est.stderr


def test_split_reports_the_gauss_newton_trace_of_some_tensors():
    model, data = mlp(nn.Tanh), batches()
    G = ggn_operator(model, CE, data).to_dense()
    k = 5 * 8 + 8  # the first layer's coordinates come first
    res = ggn_trace(model, CE, data, split=["0.weight", "0.bias"])
    assert res.split_value == pytest.approx(float(G[:k, :k].trace()), rel=1e-10)
    assert res.value == pytest.approx(float(G.trace()), rel=1e-10)
    with pytest.raises(ValueError, match="split and exact overlap"):
        ggn_trace(model, CE, data, split=["0.weight"], exact=["0.weight", "0.bias"])


class Direct(nn.Module):
    """``fc1.weight`` also enters directly, affinely: not through ``fc1``'s outputs only."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))) + (x @ self.fc1.weight.T)[:, :4]


class Twice(nn.Module):
    """``fc1`` is called twice on one path."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 5), nn.Linear(5, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.fc1(x)))))


class Tied(nn.Module):
    """``fc2.weight`` is ``fc1.weight``; the biases are their own."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 4)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.out(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class Tokens(nn.Module):
    """``fc1`` acts on each of 5 tokens: its weight is shared along a dimension."""

    def __init__(self):
        super().__init__()
        self.fc1, self.out = nn.Linear(1, 3), nn.Linear(15, 4)

    def forward(self, x):
        return self.out(torch.tanh(self.fc1(x.unsqueeze(-1))).flatten(1))


@pytest.mark.parametrize(("cls", "exact"), [(Direct, []), (Twice, []), (Tokens, []),
                                            (Tied, ["fc1.bias", "fc2.bias"])])
def test_linear_blocks_refuse_a_weight_used_elsewhere_and_stay_exact(cls, exact):
    torch.manual_seed(1)
    model, data = cls().double(), batches()
    route = plan(model, CE, data)
    assert route.exact == exact and route.residual
    res = hessian_trace(model, CE, data, method="gauss_newton", probes=200, progress=False)
    assert res.value == pytest.approx(dense_trace(model, CE, data), rel=1e-10)
    assert linear_blocks(model, data, route.nonlinear) == exact


def test_auto_takes_the_exact_route_only_when_it_is_exact_and_within_the_probes():
    model, data = mlp(nn.Tanh), batches()
    res = hessian_trace(model, CE, data, progress=False)  # "auto", 100 probes
    assert res.method == "gauss_newton" and res.stderr == 0.0
    assert res.value == pytest.approx(dense_trace(model, CE, data), rel=1e-10)
    # 20 passes per batch exceed 10 probes; an operator; a loss that is not a mean
    assert hessian_trace(model, CE, data, probes=10, progress=False).method == "xtrace"
    assert hessian_trace(model, CE, data, probes=30, max_matvecs=10,
                         progress=False).method == "xtrace"
    op = hessian_operator(model, CE, data)
    assert hessian_trace(op, probes=30, progress=False).method == "xtrace"

    def summed(o, t):
        return nn.functional.cross_entropy(o, t, reduction="sum")

    with pytest.raises(NotApplicable, match="mean of per-example terms"):
        plan(model, summed, data)
    res = hessian_trace(model, summed, data, probes=30, progress=False)
    assert res.method == "xtrace"


def test_a_parameter_subset_is_the_principal_block():
    model, data = mlp(nn.Tanh), batches()
    params = ["2.weight", "4.weight"]
    res = hessian_trace(model, CE, data, method="gauss_newton", probes=200, params=params,
                        progress=False)
    assert res.value == pytest.approx(dense_trace(model, CE, data, params=params), rel=1e-10)


def test_a_budget_returns_the_examples_done_with_their_error():
    model, data = mlp(), batches()
    res = hessian_trace(model, CE, data, method="gauss_newton", max_matvecs=3, progress=False)
    assert not res.converged and res.n_matvecs == 3
    first = ggn_trace(model, CE, data[:1])  # the first batch of 13 examples alone
    assert res.value == pytest.approx(first.value, rel=1e-12)
    assert res.stderr == pytest.approx(float(first.per_example.std() / 13**0.5), rel=1e-12)


def test_refusals_name_the_problem():
    model, data = mlp(), batches()
    with pytest.raises(ValueError, match="needs a model with loss_fn and data, got Tensor"):
        hessian_trace(torch.eye(3), method="gauss_newton")
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0, 4.0]).double())
    with pytest.raises(ValueError, match="mean of per-example terms"):
        hessian_trace(model, weighted, data, method="gauss_newton", progress=False)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    with pytest.raises(ValueError, match="one example at a time"):
        hessian_trace(bn, CE, data, method="gauss_newton", eval_mode=False, progress=False)
    with pytest.raises(ValueError, match="probes must be >= 4 for gauss_newton"):
        hessian_trace(model, CE, data, method="gauss_newton", probes=3, progress=False)
