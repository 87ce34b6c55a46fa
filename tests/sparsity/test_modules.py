"""Tests of the sparsity modules and sparsify: closed forms, constraints, bit-identity."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from flatlab.sparsity import (
    JSquaredReLU,
    ReLUToJSquaredReLU,
    RestrictedLayerNorm,
    ZerothBias,
    activation_sparsity,
    constrain_,
    sparsify,
)


class Block(nn.Module):
    """Pre-LN residual MLP block: x + W2 relu(K LN(x))."""

    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, d_ff), nn.ReLU(), nn.Linear(d_ff, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def _model(seed: int = 0, d: int = 6, tokens: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(Block(d, 12), Block(d, 12), nn.Linear(d, 3))
    with torch.no_grad():  # a non-trivial LayerNorm so restrictions matter
        for b in (net[0], net[1]):
            b.norm.weight.uniform_(-1.5, 1.5)
            b.norm.bias.uniform_(-0.5, 0.5)
    return net


def test_jsrelu_forward_backward_closed_form() -> None:
    h = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    out = JSquaredReLU()(h)
    want = torch.where(h >= 0, h**2 / 2 + h, torch.zeros_like(h))
    assert torch.equal(out, want)
    out.sum().backward()
    want_grad = torch.where(h >= 0, h + 1, torch.zeros_like(h)).detach()
    torch.testing.assert_close(h.grad, want_grad, rtol=0, atol=1e-15)


def test_jsrelu_gradcheck_away_from_zero() -> None:
    h = torch.randn(20, dtype=torch.float64)
    h = (h + 0.2 * h.sign()).requires_grad_(True)  # keep |h| >= 0.2
    assert torch.autograd.gradcheck(JSquaredReLU(), (h,))
    assert torch.autograd.gradcheck(JSquaredReLU(cap=1.0), (h,))


def test_jsrelu_cap_continues_linearly() -> None:
    f = JSquaredReLU(cap=4.0)
    h = torch.tensor([3.0, 4.0, 5.0, 6.0], dtype=torch.float64)
    assert f(h).tolist() == pytest.approx([7.5, 12.0, 17.0, 22.0])


def test_mix_is_relu_at_zero_and_jsrelu_at_one() -> None:
    h = torch.randn(50)
    mix = ReLUToJSquaredReLU(ramp_steps=10)
    assert torch.equal(mix(h), torch.relu(h))
    mix.set_step(5)
    assert float(mix.mix) == 0.5
    assert torch.allclose(mix(h), 0.5 * torch.relu(h) + 0.5 * JSquaredReLU()(h))
    mix.set_step(100)
    assert torch.allclose(mix(h), JSquaredReLU()(h))
    with pytest.raises(ValueError, match="mix must be in"):
        mix.set_mix(1.5)


def test_zeroth_bias_clipping_rule() -> None:
    norm = nn.LayerNorm(3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, -0.5, 1.0]))
    zb = ZerothBias(nn.Identity(), 3, tokens=2, placement="input", clip=0.1, norm=norm)
    with torch.no_grad():
        zb.bias0.copy_(torch.tensor([[1.0, -1.0, 0.05], [-0.3, 0.01, -0.2]]))
    zb.clip_()
    want = torch.tensor([[0.2, -0.05, 0.05], [-0.2, 0.01, -0.1]])
    assert torch.allclose(zb.bias0, want)
    x = torch.randn(4, 2, 3)
    assert torch.allclose(zb(x), x + want)
    out = ZerothBias(nn.Linear(3, 3), 3, placement="output", clip=0.5)
    with torch.no_grad():
        out.bias0.fill_(2.0)
    out.clip_()  # no LayerNorm: |gamma| = 1
    assert torch.equal(out.bias0, torch.full((3,), 0.5))
    assert torch.allclose(out(x), out.inner(x) + 0.5)
    with pytest.raises(ValueError, match="placement must be one of"):
        ZerothBias(nn.Identity(), 3, placement="middle")


def test_restricted_layernorm_scratch_clamp_and_finetune_ramp() -> None:
    ln = nn.LayerNorm(4)
    with torch.no_grad():
        ln.weight.copy_(torch.tensor([0.2, -0.3, 1.5, -2.0]))
        ln.bias.fill_(0.7)
    scratch = RestrictedLayerNorm.from_layernorm(ln, "scratch")
    assert scratch.bias is None
    scratch.restrict_()
    assert scratch.weight.tolist() == pytest.approx([1.0, 1.0, 1.5, 1.0])
    fine = RestrictedLayerNorm.from_layernorm(ln, "finetune", ramp_steps=10)
    assert not fine.bias.requires_grad and fine.bias.tolist() == pytest.approx([0.7] * 4)
    x = torch.randn(5, 4)
    assert torch.equal(fine(x), ln(x))
    fine.restrict_(0)
    assert torch.equal(fine.weight, ln.weight)
    fine.restrict_(5)  # floor 0.5, signs kept
    assert fine.weight.tolist() == pytest.approx([0.5, -0.5, 1.5, -2.0])
    fine.restrict_(20)
    assert fine.weight.tolist() == pytest.approx([1.0, -1.0, 1.5, -2.0])


@pytest.mark.parametrize("placement", ["input", "output"])
def test_sparsify_at_ramp_zero_is_bit_identical(placement: str) -> None:
    net = _model()
    x = torch.randn(8, 5, 6)
    before = net(x)
    sparsify(net, activation="ramp", zeroth_bias=placement, tokens=5, layernorm="finetune")
    assert isinstance(net[0].norm, RestrictedLayerNorm)
    assert isinstance(net[0].mlp[1], ReLUToJSquaredReLU)
    wrapped = net[0].mlp[0] if placement == "input" else net[0].mlp[2]
    assert isinstance(wrapped, ZerothBias) and wrapped.bias0.shape == (5, 6)
    assert wrapped._norm[0] is net[0].norm
    assert torch.equal(net(x), before)
    constrain_(net, 0)
    assert torch.equal(net(x), before)


def test_sparsify_from_scratch_swaps_activation() -> None:
    net = sparsify(_model(), zeroth_bias="input", layernorm="scratch")
    assert isinstance(net[1].mlp[1], JSquaredReLU)
    assert net[1].norm.bias is None
    assert set(activation_sparsity(net, (torch.randn(4, 6), torch.zeros(4))).per_layer) == {
        "0.mlp.1", "1.mlp.1"
    }


def test_sparsified_model_trains_and_state_dict_round_trips() -> None:
    net = sparsify(_model(1), activation="ramp", zeroth_bias="input", tokens=4,
                   layernorm="finetune", ramp_steps=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, 6, generator=g), torch.randint(0, 3, (16,), generator=g)

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(net(x).mean(1), y)

    first = float(loss().detach())
    for step in range(1, 6):
        opt.zero_grad()
        loss().backward()
        opt.step()
        constrain_(net, step)
    assert float(loss().detach()) < first
    zb = net[0].mlp[0]
    assert zb.bias0.abs().max() > 0
    assert (zb.bias0.abs() <= 0.1 * net[0].norm.weight.abs() + 1e-7).all()
    assert float(net[0].mlp[1].mix) == 1.0
    assert (net[0].norm.weight.abs() >= 1.0 - 1e-7).all()
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    other = sparsify(_model(2), activation="ramp", zeroth_bias="input", tokens=4,
                     layernorm="finetune", ramp_steps=3)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other(x), net(x))


def test_sparsify_bad_inputs() -> None:
    with pytest.raises(ValueError, match="activation must be one of"):
        sparsify(_model(), activation="gelu")
    with pytest.raises(ValueError, match="found no ReLU MLP block in Sequential"):
        sparsify(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ValueError, match="needs a LayerNorm"):
        sparsify(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 2)), layernorm="scratch")


class TokenMix(nn.Module):
    """A token-mixing MLP on (B, T, D): the MLP acts on the transposed (B, D, T) tensor."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(tokens, 2 * tokens)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(2 * tokens, tokens)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.fc2(self.act(self.fc1(self.ln(z).transpose(1, 2)))).transpose(1, 2)


def test_sparsify_example_gives_token_shapes_and_gamma_axis() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(TokenMix(4, 6), Block(6, 12))
    x = torch.randn(3, 4, 6)
    before = net(x)
    sparsify(net, activation="ramp", zeroth_bias="input", layernorm="finetune", example=x[:1])
    tok, ch = net[0].fc1, net[1].mlp[0]
    assert tok.bias0.shape == (6, 4)  # (D, T): the token MLP sees channels as positions
    assert ch.bias0.shape == (4, 6)
    assert torch.equal(net(x), before)
    with torch.no_grad():
        net[0].ln.weight.copy_(torch.arange(1.0, 7.0))
        tok.bias0.fill_(10.0)
    tok.clip_()  # gamma (size D = 6) scales axis 0 of the (6, 4) bias
    want = (0.1 * torch.arange(1.0, 7.0)).unsqueeze(1).expand(6, 4)
    assert torch.allclose(tok.bias0, want)


# ------------------------------------------------------------------ shifted S-shaped activation
@pytest.mark.parametrize(("sx", "sy"), [(1.6, 1.6), (1.6, -1.6), (-1.6, 1.6), (-1.6, -1.6)])
def test_shifted_squared_s_band_is_its_zero_derivative_set_and_its_output_is_shift_y(sx, sy):
    from flatlab.sparsity import ShiftedSquaredS

    f = ShiftedSquaredS(sx, sy)
    h = torch.linspace(-6, 6, 1201, dtype=torch.float64, requires_grad=True)
    out = f(h)
    (deriv,) = torch.autograd.grad(out.sum(), h)
    band = f.zero_derivative(h.detach())
    assert torch.equal(band, deriv == 0)  # the declared region is exactly where f' = 0
    assert torch.all(out.detach()[band] == sy)  # nonzero output on the band
    assert not bool(f.zero_derivative(torch.zeros(1, dtype=torch.float64)))  # 0 is off band
    u = h.detach() - sx  # closed form outside the band
    ref = torch.relu(u - 1.5) ** 2 - torch.relu(-u - 1.5) ** 2 + sy
    assert torch.allclose(out.detach(), ref)


def test_shifted_squared_s_is_found_by_the_probe_and_counted_as_its_band():
    from flatlab.models import ResidualMLP
    from flatlab.sparsity import ShiftedSquaredS, activation_sparsity

    torch.manual_seed(0)
    model = ResidualMLP(6, 3, width=8, depth=1, activation=lambda: ShiftedSquaredS(1.6, -1.6))
    x = torch.randn(50, 6)
    seen = {}
    act = model.blocks[0].act
    handle = act.register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0].detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    res = activation_sparsity(model, (x, torch.zeros(50, dtype=torch.long)), output_tol=0.1)
    h = seen["h"]
    assert res.mean == pytest.approx(float(((h - 1.6).abs() <= 1.5).double().mean()))
    out = act(h)
    assert res.mean_zero_output == pytest.approx(float((out.abs() <= 0.1).double().mean()))


@pytest.mark.parametrize(("kwargs", "match"), [({"width": 0.0}, "width must be > 0"),
                                               ({"shift_x": float("nan")}, "finite")])
def test_shifted_squared_s_rejects_bad_input(kwargs, match):
    from flatlab.sparsity import ShiftedSquaredS

    with pytest.raises(ValueError, match=match):
        ShiftedSquaredS(**kwargs)
