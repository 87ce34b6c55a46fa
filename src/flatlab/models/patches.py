"""Cutting inputs into non-overlapping patches (tokens) for the ViT and the MLP-mixer.

* Images ``(B, C, H, W)`` with patch ``p`` (``p`` divides ``H`` and ``W``) become
  ``(B, T, C p^2)`` tokens with ``T = (H / p)(W / p)``, row-major over the patch grid.
* Sequences ``(B, L)`` or ``(B, C, L)`` (MNIST-1D is ``(B, 40)``) with patch ``p`` dividing
  ``L`` become ``(B, T, C p)`` with ``T = L / p`` (40 / 4 = 10 tokens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from flatlab._checks import check_positive_int

__all__ = ["Patchify"]


class Patchify(nn.Module):
    """``x -> (B, T, patch_dim)`` for images ``(C, H, W)`` or sequences ``(L,)`` / ``(C, L)``.

    Attributes:
        num_tokens: ``T``.
        patch_dim: features per token (``C p^2`` for images, ``C p`` for sequences).
    """

    def __init__(self, input_shape: Sequence[int], patch_size: int) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        p = check_positive_int("patch_size", patch_size)
        if len(shape) == 1:
            shape = (1, *shape)
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise ValueError(f"input_shape must be (L,), (C, L) or (C, H, W), got {input_shape}")
        spatial = shape[1:]
        if any(s % p for s in spatial):
            raise ValueError(f"patch_size must divide the input's spatial size {spatial}, got {p}")
        self.shape, self.p = shape, p
        self.num_tokens = math.prod(s // p for s in spatial)
        self.patch_dim = shape[0] * p ** len(spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, b = self.p, x.shape[0]
        if len(self.shape) == 2:  # sequences
            x = x.reshape(b, *self.shape)  # (B, C, L)
            x = x.unfold(2, p, p)  # (B, C, T, p)
            return x.permute(0, 2, 1, 3).reshape(b, self.num_tokens, self.patch_dim)  # (B, T, Cp)
        c, h, w = self.shape
        x = x.reshape(b, c, h // p, p, w // p, p)  # (B, C, H/p, p, W/p, p)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
        return x.reshape(b, self.num_tokens, self.patch_dim)  # (B, T, C p^2)
