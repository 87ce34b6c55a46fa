"""A tiny Vision Transformer (Dosovitskiy et al., arXiv 2010.11929) for small images and for
MNIST-1D patches.

``z_0 = Patchify(x) W_e + E_pos`` (``(B, T, D)``, learned position embeddings), then ``depth``
pre-LayerNorm blocks

    z <- z + Attn(LN_1(z)),      Attn = softmax(Q K^T / sqrt(D / heads)) V per head, then W_o
    z <- z + W_2 act(W_1 LN_2(z) + b_1) + b_2      (the MLP sublayer, :class:`MLPBlock`)

and ``f(x) = W_head LN_f(mean_t z_t)`` (mean pooling over tokens instead of a class token).
The MLP activation of each block is its own module (``blocks[i].mlp.act``), where the
sparsity probe looks (Li et al., ICLR 2023 measured "lazy neurons" there in ViT-B/16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from flatlab._checks import check_positive_int
from flatlab.models.activations import ActivationSpec
from flatlab.models.mlp import MLPBlock
from flatlab.models.patches import Patchify

__all__ = ["SelfAttention", "TransformerBlock", "ViT"]


class SelfAttention(nn.Module):
    """Multi-head self-attention on ``(B, T, D)`` (no mask)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads must divide dim, got heads={heads} and dim={dim}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, t, d = z.shape
        q, k, v = self.qkv(z).split(d, dim=2)  # 3 x (B, T, D)
        q, k, v = (u.view(b, t, self.heads, d // self.heads).transpose(1, 2) for u in (q, k, v))
        # written out rather than F.scaled_dot_product_attention: the fused CPU kernel's
        # backward has no derivative, and Hessian-vector products need double backward
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        y = w @ v  # (B, heads, T, T) @ (B, heads, T, D / heads) -> (B, heads, T, D / heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class TransformerBlock(nn.Module):
    """Pre-LN block: ``z + Attn(LN(z))``, then the residual MLP sublayer."""

    def __init__(self, dim: int, heads: int, hidden: int, activation: ActivationSpec) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = MLPBlock(dim, hidden, activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.attn(self.ln(z))  # (B, T, D)
        return self.mlp(z)  # (B, T, D)


class ViT(nn.Module):
    """Tiny ViT over patches of images ``(C, H, W)`` or sequences ``(L,)`` / ``(C, L)``.

    Args:
        input_shape: e.g. ``(40,)`` for MNIST-1D or ``(1, 16, 16)``.
        num_classes: outputs.
        patch_size: patch length / side (must divide the spatial sizes).
        dim: token width ``D``.
        depth: number of blocks.
        heads: attention heads (divide ``dim``).
        mlp_ratio: MLP hidden width is ``mlp_ratio * dim``.
        activation: MLP nonlinearity, name or module class.

    Example:
        >>> m = ViT((40,), 10, patch_size=4, dim=16, depth=1, heads=2)
        >>> m.num_tokens, m(torch.zeros(3, 40)).shape
        (10, torch.Size([3, 10]))
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (40,),
        num_classes: int = 10,
        patch_size: int = 4,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        activation: ActivationSpec = "relu",
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("dim", dim)
        check_positive_int("depth", depth)
        check_positive_int("heads", heads)
        check_positive_int("mlp_ratio", mlp_ratio)
        self.patchify = Patchify(input_shape, patch_size)
        self.num_tokens = self.patchify.num_tokens
        self.embed = nn.Linear(self.patchify.patch_dim, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.num_tokens, dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio * dim, activation) for _ in range(depth)
        )
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(self.patchify(x)) + self.pos  # (B, T, D)
        for block in self.blocks:
            z = block(z)  # (B, T, D)
        return self.head(self.ln_f(z.mean(dim=1)))  # (B, D) -> (B, num_classes)
