"""Tests of flatlab.sparsity.probe: hand-computed fractions, weighting, hooks and modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.sparsity import SparsityProbe, activation_sparsity


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))


def _hand_fractions(net: nn.Sequential, x: torch.Tensor) -> tuple[float, float]:
    h1 = net[0](x)
    h2 = net[2](torch.relu(h1))
    return float((h1 <= 0).double().mean()), float((h2 <= 0).double().mean())


def test_relu_mlp_matches_hand_computed_fraction() -> None:
    net = _mlp()
    x = torch.randn(37, 3)
    res = activation_sparsity(net, (x, torch.zeros(37)))
    s1, s2 = _hand_fractions(net, x)
    assert list(res.per_layer) == ["1", "3"]
    assert res.per_layer["1"] == pytest.approx(s1, abs=1e-12)
    assert res.per_layer["3"] == pytest.approx(s2, abs=1e-12)
    assert res.mean == pytest.approx((s1 + s2) / 2)
    # for ReLU the zero outputs are exactly the zero-derivative entries
    assert res.zero_output == pytest.approx(res.per_layer)
    assert res.entries == {"1": 37 * 5, "3": 37 * 4}
    assert res.n_examples == 37


def test_two_activation_kinds() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 6), nn.Hardtanh(-0.2, 0.3))
    x = torch.randn(50, 3)
    res = activation_sparsity(net, (x, x))
    h1 = net[0](x)
    h2 = net[2](torch.relu(h1))
    assert res.per_layer["1"] == pytest.approx(float((h1 <= 0).double().mean()))
    want = float(((h2 <= -0.2) | (h2 >= 0.3)).double().mean())
    assert res.per_layer["3"] == pytest.approx(want)
    # Hardtanh saturates at nonzero values: zero derivative is not zero output
    assert res.zero_output["3"] == pytest.approx(float((net[3](h2) == 0).double().mean()))
    assert res.zero_output["3"] < res.per_layer["3"]


def test_named_smooth_activation_uses_autograd_derivative() -> None:
    net = nn.Sequential(nn.Linear(2, 4), nn.Softplus(beta=1.0, threshold=0.5))
    x = torch.randn(20, 2)
    res = activation_sparsity(net, (x, x), modules=["1"], deriv_tol=0.1)
    h = net[0](x)
    assert res.per_layer["1"] == pytest.approx(float((torch.sigmoid(h) <= 0.1).double().mean()))


def test_unequal_batches_weighted_by_size() -> None:
    net = _mlp()
    x = torch.randn(40, 3)
    parts = [(x[:3], x[:3]), (x[3:40], x[3:40])]
    res = activation_sparsity(net, parts)
    s1, _ = _hand_fractions(net, x)
    assert res.per_layer["1"] == pytest.approx(s1, abs=1e-12)
    assert res.n_examples == 40
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x), batch_size=7)
    assert activation_sparsity(net, loader).per_layer == pytest.approx(res.per_layer)


def test_per_position_on_token_inputs() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU())
    x = torch.randn(6, 4, 3)  # (B, T, d)
    res = activation_sparsity(net, (x, x), per_position=True)
    h = net[0](x)
    want = (h <= 0).double().mean(dim=(0, 2))
    assert res.per_position is not None
    assert res.per_position["1"] == pytest.approx(want.tolist())
    assert res.per_layer["1"] == pytest.approx(float(want.mean()))


def test_flop_savings_of_second_matmul() -> None:
    net = _mlp()
    x = torch.randn(10, 3)
    res = activation_sparsity(net, (x, x))
    z1 = res.zero_output["1"] * 50
    assert res.second_matmul_flops["1"] == 2 * 4 * 50
    assert res.skippable_flops["1"] == pytest.approx(2 * 4 * z1)
    total = res.second_matmul_flops["1"] + res.second_matmul_flops["3"]
    skip = res.skippable_flops["1"] + res.skippable_flops["3"]
    assert res.flop_savings == pytest.approx(skip / total)


def test_restores_mode_and_removes_hooks_on_error() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            out = self.net(x)
            if self.calls == 2:
                raise RuntimeError("boom")
            return out

    model = Boom()
    model.train()
    model.net[1].eval()  # mixed modes must come back exactly
    with pytest.raises(RuntimeError, match="boom"):
        activation_sparsity(model, [(torch.randn(4, 3), torch.zeros(4))] * 3)
    assert model.training and model.net[0].training and not model.net[1].training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_measures_in_eval_mode_by_default() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 50), nn.Dropout(0.9), nn.ReLU())
    x = torch.randn(30, 3)
    net.train()
    res = activation_sparsity(net, (x, x))
    assert res.per_layer["2"] == pytest.approx(float((net[0](x) <= 0).double().mean()))
    assert net.training
    dropped = activation_sparsity(net, (x, x), train_mode=True)
    assert dropped.per_layer["2"] > res.per_layer["2"] + 0.3


def test_context_manager_for_own_loop() -> None:
    net = _mlp()
    x = torch.randn(12, 3)
    with SparsityProbe(net) as probe:
        net(x[:5])
        net(x[5:])
        assert len(net[1]._forward_pre_hooks) == 1
    assert not net[1]._forward_pre_hooks and not net[1]._forward_hooks
    s1, _ = _hand_fractions(net, x)
    assert probe.result().per_layer["1"] == pytest.approx(s1)
    probe.reset()
    with pytest.raises(RuntimeError, match="no activation passed"):
        probe.result()


def test_inplace_relu_counts_pre_activation() -> None:
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(3, 9), nn.ReLU(inplace=True))
    x = torch.randn(25, 3)
    res = activation_sparsity(net, (x, x))
    assert res.per_layer["1"] == pytest.approx(float((net[0](x) <= 0).double().mean()))


def test_bad_inputs() -> None:
    net = _mlp()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="modules must be submodules of model, got 'nope'"):
        activation_sparsity(net, (x, x), modules=["nope"])
    with pytest.raises(ValueError, match="not inside it"):
        activation_sparsity(net, (x, x), modules=[nn.ReLU()])
    with pytest.raises(ValueError, match="no activation module found in Sequential: looked for"):
        activation_sparsity(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), (x, x))
    with pytest.raises(ValueError, match="data is empty"):
        activation_sparsity(net, [])
    with pytest.raises(ValueError, match="output_tol must be >= 0, got -1.0"):
        activation_sparsity(net, (x, x), output_tol=-1.0)
    with pytest.raises(ValueError, match="max_batches must be >= 1"):
        activation_sparsity(net, (x, x), max_batches=0)
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_zero_output_read_off_pre_activation_matches_outputs() -> None:
    from flatlab.sparsity import JSquaredReLU

    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 40), nn.ReLU(), nn.Linear(40, 40), JSquaredReLU())
    x = torch.randn(64, 3)
    res = activation_sparsity(net, (x, x), output_tol=0.3)
    h1 = net[0](x)
    h2 = net[2](torch.relu(h1))
    assert res.zero_output["1"] == pytest.approx(float((torch.relu(h1) <= 0.3).double().mean()))
    want = float((net[3](h2).abs() <= 0.3).double().mean())
    assert res.zero_output["3"] == pytest.approx(want)
    assert res.zero_output["3"] > res.per_layer["3"]  # 0 < f(h) <= 0.3 counts as zero output


def test_exact_zero_pre_activations_count_as_zero_derivative() -> None:
    lin = nn.Linear(3, 8)
    with torch.no_grad():
        lin.weight[:3].zero_()
        lin.bias[:3].zero_()  # units 0-2 have h == 0 exactly
    net = nn.Sequential(lin, nn.ReLU())
    x = torch.randn(30, 3)
    res = activation_sparsity(net, (x, x))
    h = lin(x)
    assert res.per_layer["1"] == float((h <= 0).double().mean())
    assert res.zero_output["1"] == float((torch.relu(h) == 0).double().mean())
    with torch.no_grad():
        res = activation_sparsity(net.double(), (x.double(), x))
    assert res.per_layer["1"] == float((lin(x.double()) <= 0).double().mean())
