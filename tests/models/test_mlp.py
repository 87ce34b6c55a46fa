import pytest
import torch
import torch.nn as nn

from flatlab.models import MLP, ResidualMLP, make_activation


@pytest.mark.parametrize("activation, cls", [("relu", nn.ReLU), ("tanh", nn.Tanh),
                                             ("gelu", nn.GELU), (nn.SiLU, nn.SiLU)])
def test_mlp_structure_and_activation_instances(activation, cls):
    model = MLP(64, 10, width=16, depth=3, activation=activation)
    acts = [m for m in model.modules() if isinstance(m, cls)]
    assert len(acts) == 3 and len({id(a) for a in acts}) == 3  # one module per layer
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(64, 16), (16, 16), (16, 16),
                                                                  (16, 10)]
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)  # images are flattened


def test_mlp_depth_zero_is_linear():
    model = MLP(3, 2, depth=0)
    x = torch.randn(5, 3)
    lin = model.layers[0]
    assert torch.allclose(model(x), x @ lin.weight.T + lin.bias)


def test_mlp_forward_matches_manual_computation():
    torch.manual_seed(0)
    model = MLP(4, 2, width=5, depth=2, activation="tanh").double()
    x = torch.randn(3, 4, dtype=torch.float64)
    l0, l1, l2 = model.layers[0], model.layers[2], model.layers[4]
    h = torch.tanh(x @ l0.weight.T + l0.bias)
    h = torch.tanh(h @ l1.weight.T + l1.bias)
    assert torch.allclose(model(x), h @ l2.weight.T + l2.bias)


def test_residual_mlp_is_pre_ln_residual():
    torch.manual_seed(0)
    model = ResidualMLP(6, 3, width=8, depth=2).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    z = model.embed(x)
    for b in model.blocks:
        z = z + b.fc2(torch.relu(b.fc1(torch.nn.functional.layer_norm(
            z, (8,), b.ln.weight, b.ln.bias))))
    expected = model.head(model.ln_f(z))
    assert torch.allclose(model(x), expected)
    assert model.blocks[0].fc1.out_features == 32  # hidden = 4 * width


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"width": 0}, ValueError, "width must be >= 1, got 0"),
        ({"depth": -1}, ValueError, "depth must be >= 0, got -1"),
        ({"activation": "swishy"}, ValueError, "activation must be one of .*got 'swishy'"),
        ({"activation": nn.ReLU()}, TypeError, "fresh instance"),
        ({"width": 2.5}, TypeError, "width must be an int"),
    ],
)
def test_mlp_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLP(4, 2, **kwargs)


def test_mlp_wrong_input_width():
    with pytest.raises(ValueError, match="input must have 4 features, got 5"):
        MLP(4, 2)(torch.zeros(1, 5))


def test_make_activation_factory():
    assert isinstance(make_activation(lambda: nn.LeakyReLU(0.2)), nn.LeakyReLU)
    with pytest.raises(TypeError, match="factory"):
        make_activation(lambda: 3)
