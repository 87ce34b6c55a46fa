"""Tests of gradient sparsity, spectral concentration and the augmented-flatness identity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from flatlab.sparsity import (
    augmented_flatness,
    gradient_sparsity,
    marchenko_pastur_ratio,
    spectral_concentration,
)


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)
    ).double()


def _data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def test_gradient_sparsity_against_autograd() -> None:
    net = _net()
    x, y = _data()
    loss_fn = nn.functional.cross_entropy
    # direct: eta = n_b * dL_b/dh for each batch
    etas, hs = [], []
    for sl in (slice(0, 10), slice(10, 24)):
        h1 = net[0](x[sl])
        h1.retain_grad()
        out = net[4](torch.relu(net[2](torch.relu(h1))))
        loss_fn(out, y[sl]).backward()
        etas.append(h1.grad * x[sl].shape[0])
        hs.append(h1.detach())
    eta = torch.cat(etas)
    for p in net.parameters():
        p.grad = None
    batches = [(x[:10], y[:10]), (x[10:], y[10:])]
    res = gradient_sparsity(net, loss_fn, batches, thresholds=(1e-3, 1e-9))
    assert res.thresholds == (1e-9, 1e-3)
    assert res.per_layer["1"][1e-3] == pytest.approx(float((eta.abs() < 1e-3).double().mean()))
    assert res.derivative["1"] == pytest.approx(float((torch.cat(hs) <= 0).double().mean()))
    # ReLU zeros in eta include every zero-derivative entry
    assert res.per_layer["1"][1e-9] >= res.derivative["1"] - 1e-12
    assert res.l1_per_token["1"] == pytest.approx(float(eta.abs().sum(1).mean()))
    assert res.l2sq_per_token["1"] == pytest.approx(float((eta**2).sum(1).mean()))
    assert net[1].inplace  # restored
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(ValueError, match="thresholds must be > 0"):
        gradient_sparsity(net, loss_fn, (x, y), thresholds=(0.0,))


def test_marchenko_pastur_ratio_closed_form() -> None:
    assert marchenko_pastur_ratio(256, 64) == pytest.approx(3.0)
    assert marchenko_pastur_ratio(64, 256) == pytest.approx(3.0)
    assert math.isinf(marchenko_pastur_ratio(8, 8))


def test_spectral_concentration_known_singular_values() -> None:
    u, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))
    w = u[:, :3] @ torch.diag(torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)) @ v.T
    res = spectral_concentration(weights={"k": w})
    assert res.ratio["k"] == pytest.approx(10.0)
    assert res.rank["k"] == 3 and res.shapes["k"] == (6, 3)
    assert res.normalized["k"] == pytest.approx(10.0 / marchenko_pastur_ratio(6, 3))
    # the authors' rule: s^2 > 0.1 mean(s^2) = 0.1 * 29.25 / 3 drops 0.5 (0.25 < 0.975)
    mean_sq = spectral_concentration(weights={"k": w}, rtol=0.1, relative_to="mean_sq")
    assert mean_sq.ratio["k"] == pytest.approx(2.5) and mean_sq.rank["k"] == 2
    low = u[:, :2] @ torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)) @ v[:, :2].T
    assert spectral_concentration(weights={"k": low}).ratio["k"] == pytest.approx(4.0)


def test_spectral_concentration_finds_key_layers() -> None:
    net = _net()
    res = spectral_concentration(net)
    assert set(res.ratio) == {"0", "2"}
    with pytest.raises(ValueError, match="must be 2-d"):
        spectral_concentration(weights={"b": net[0].bias})
    with pytest.raises(ValueError, match="needs a model or weights"):
        spectral_concentration()


def test_augmented_flatness_matches_per_sample_gradients() -> None:
    net = _net(3)
    x, y = _data(20, 5)
    loss_fn = nn.functional.cross_entropy
    res = augmented_flatness(net, loss_fn, [(x[:7], y[:7]), (x[7:], y[7:])])
    params = {k: v.detach() for k, v in net.named_parameters()}

    def sample_loss(p, xi, yi):
        return loss_fn(functional_call(net, p, (xi[None],)), yi[None])

    per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    n = x.shape[0]
    for key in ("0", "2"):
        # full-data mean loss: token t contributes (1/n) d l_t / dK
        direct = float(((per[f"{key}.weight"] / n) ** 2).sum())
        assert res.value[key] == pytest.approx(direct, rel=1e-10)
        assert res.identity_gap[key] < 1e-10
    h1 = net[0](x)
    assert res.density["0"] == pytest.approx(float((h1 > 0).double().mean()))
    assert res.entries["0"] == 20 * 6


@pytest.mark.parametrize("measure", [gradient_sparsity, augmented_flatness])
def test_measures_clean_up_after_an_error(measure) -> None:
    net = _net()
    net.train()
    x, y = _data()

    def bad_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("bad loss")

    with pytest.raises(RuntimeError, match="bad loss"):
        measure(net, bad_loss, (x, y))
    assert net.training and net[1].inplace
    for m in net.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


def test_eigenvalue_ratio_is_the_ratio_of_the_eigenvalues_of_k_k_transpose() -> None:
    w = torch.randn(12, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    res = spectral_concentration(weights={"K": w})
    eig = torch.linalg.eigvalsh(w @ w.T)
    nz = eig[eig > 1e-9 * eig.max()]
    assert res.eigenvalue_ratio["K"] == pytest.approx(float(nz.max() / nz.min()), rel=1e-10)


def test_zeroth_bias_defaults_to_the_output_placement() -> None:
    from torch import nn

    from flatlab.sparsity import ZerothBias

    zb = ZerothBias(nn.Linear(3, 3), 3)
    assert zb.placement == "output"
    with torch.no_grad():
        zb.bias0.fill_(0.5)
    x = torch.randn(2, 3)
    assert torch.allclose(zb(x), zb.inner(x) + 0.5)
