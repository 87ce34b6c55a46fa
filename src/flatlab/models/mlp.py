"""Multilayer perceptrons: the plain MLP and a pre-LayerNorm residual MLP.

**MLP.** ``depth`` hidden layers of ``width`` units:
``h_0 = flatten(x)``, ``h_l = act(W_l h_{l-1} + b_l)`` for ``l = 1..depth``,
``f(x) = W_out h_depth + b_out``. With ``depth=0`` it is a linear model.

**ResidualMLP** (pre-LayerNorm, as in a transformer's MLP sublayer, used by the activation
sparsity study, Peng et al. arXiv 2309.03004): ``z_0 = W_in flatten(x)``, then ``depth`` blocks
``z_l = z_{l-1} + W2_l act(W1_l LN_l(z_{l-1}) + b1_l) + b2_l`` with ``W1_l`` of shape
``(hidden, width)``, and ``f(x) = W_out LN_f(z_depth)``.

Inputs of any shape ``(B, *input_shape)`` are flattened to ``(B, in_dim)`` first. Each
activation is its own module (``flatlab.models.activations``), so hooks find them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from flatlab._checks import check_positive_int
from flatlab.models.activations import ActivationSpec, make_activation

__all__ = ["MLP", "ResidualMLP", "MLPBlock"]


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"depth must be an int, got {depth!r} ({type(depth).__name__})")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    return depth


class MLP(nn.Module):
    """Fully connected network ``in_dim -> [width] * depth -> out_dim``.

    Args:
        in_dim: number of input features (inputs are flattened after the batch dimension).
        out_dim: number of outputs (classes, or regression targets).
        width: hidden units per layer.
        depth: number of hidden layers (0 gives a linear model).
        activation: name (``"relu"``, ``"tanh"``, ``"gelu"``, ...) or module class.
        bias: whether the linear layers have biases.

    Attributes:
        layers: ``nn.Sequential`` of ``Linear, act, Linear, act, ..., Linear``.

    Example:
        >>> model = MLP(64, 10, width=32, depth=2, activation="tanh")
        >>> model(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int = 128,
        depth: int = 2,
        activation: ActivationSpec = "relu",
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        check_positive_int("width", width)
        _check_depth(depth)
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width, bias=bias), make_activation(activation)]
            d = width
        layers.append(nn.Linear(d, out_dim, bias=bias))
        self.in_dim, self.out_dim = in_dim, out_dim
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_dim)
        if x.shape[1] != self.in_dim:
            raise ValueError(f"input must have {self.in_dim} features, got {x.shape[1]}")
        return self.layers(x)  # (B, out_dim)


class MLPBlock(nn.Module):
    """Pre-LN residual block ``z + fc2(act(fc1(ln(z))))``; ``act`` is a separate module."""

    def __init__(self, width: int, hidden: int, activation: ActivationSpec = "relu") -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # z: (..., width) -> (..., hidden) -> (..., width)
        return z + self.fc2(self.act(self.fc1(self.ln(z))))


class ResidualMLP(nn.Module):
    """Pre-LayerNorm residual MLP: ``Linear -> depth x MLPBlock -> LayerNorm -> Linear``.

    Args:
        in_dim, out_dim: input features (flattened) and outputs.
        width: residual stream width.
        depth: number of blocks (>= 1).
        hidden: hidden units inside each block (default ``4 * width``).
        activation: name or module class of the block nonlinearity.

    Example:
        >>> ResidualMLP(40, 10, width=16, depth=2)(torch.zeros(3, 40)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int = 64,
        depth: int = 2,
        hidden: int | None = None,
        activation: ActivationSpec = "relu",
    ) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        check_positive_int("out_dim", out_dim)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        hidden = 4 * width if hidden is None else check_positive_int("hidden", hidden)
        self.in_dim = in_dim
        self.embed = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(MLPBlock(width, hidden, activation) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x.flatten(1))  # (B, width)
        for block in self.blocks:
            z = block(z)  # (B, width)
        return self.head(self.ln_f(z))  # (B, out_dim)
