"""A tiny MLP-Mixer (Tolstikhin et al., arXiv 2105.01601) over image or MNIST-1D patches.

Tokens ``z_0 = Patchify(x) W_e`` (``(B, T, D)``); each of ``depth`` blocks mixes across tokens,
then across channels, both pre-LayerNorm with a residual:

    z <- z + (W_2^tok act(W_1^tok LN_1(z)^T))^T     (token mixing: Linear over T)
    z <- z + W_2^ch act(W_1^ch LN_2(z))              (channel mixing: Linear over D)

then ``f(x) = W_head LN_f(mean_t z_t)``. Each MLP's activation is its own module, placed
between its two ``nn.Linear`` children (``blocks[i].token.act``, ``blocks[i].channel.act``), so
the sparsity probe finds and ``sparsify`` swaps them. With MNIST-1D (length 40) and
``patch_size=4`` there are 10 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from flatlab._checks import check_positive_int
from flatlab.models.activations import ActivationSpec, make_activation
from flatlab.models.mlp import MLPBlock
from flatlab.models.patches import Patchify

__all__ = ["Mixer", "MixerBlock", "TokenMixing"]


class TokenMixing(nn.Module):
    """``z + (fc2(act(fc1(LN(z)^T))))^T`` on ``(B, T, D)``: an MLP over the token axis."""

    def __init__(self, tokens: int, dim: int, hidden: int, activation: ActivationSpec) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(tokens, hidden)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(hidden, tokens)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = self.ln(z).transpose(1, 2)  # (B, D, T)
        u = self.fc2(self.act(self.fc1(u)))  # (B, D, hidden) -> (B, D, T)
        return z + u.transpose(1, 2)  # (B, T, D)


class MixerBlock(nn.Module):
    """Token mixing then channel mixing (:class:`~flatlab.models.mlp.MLPBlock`)."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int,
                 activation: ActivationSpec) -> None:
        super().__init__()
        self.token = TokenMixing(tokens, dim, token_hidden, activation)
        self.channel = MLPBlock(dim, channel_hidden, activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.channel(self.token(z))  # (B, T, D)


class Mixer(nn.Module):
    """Tiny MLP-Mixer.

    Args:
        input_shape: ``(40,)`` for MNIST-1D, or ``(C, H, W)``.
        num_classes: outputs.
        patch_size: patch length / side.
        dim: token width ``D``.
        depth: number of mixer blocks.
        token_hidden: hidden width of token mixing (default ``2 T``).
        channel_hidden: hidden width of channel mixing (default ``4 D``).
        activation: name or module class.

    Example:
        >>> m = Mixer((40,), 10, patch_size=4, dim=16, depth=1)
        >>> m.num_tokens, m(torch.zeros(2, 40)).shape
        (10, torch.Size([2, 10]))
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (40,),
        num_classes: int = 10,
        patch_size: int = 4,
        dim: int = 32,
        depth: int = 2,
        token_hidden: int | None = None,
        channel_hidden: int | None = None,
        activation: ActivationSpec = "relu",
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("dim", dim)
        check_positive_int("depth", depth)
        self.patchify = Patchify(input_shape, patch_size)
        t = self.num_tokens = self.patchify.num_tokens
        th = 2 * t if token_hidden is None else check_positive_int("token_hidden", token_hidden)
        ch = 4 * dim if channel_hidden is None else check_positive_int("channel_hidden",
                                                                       channel_hidden)
        self.embed = nn.Linear(self.patchify.patch_dim, dim)
        self.blocks = nn.ModuleList(MixerBlock(t, dim, th, ch, activation) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(self.patchify(x))  # (B, T, D)
        for block in self.blocks:
            z = block(z)  # (B, T, D)
        return self.head(self.ln_f(z.mean(dim=1)))  # (B, D) -> (B, num_classes)
