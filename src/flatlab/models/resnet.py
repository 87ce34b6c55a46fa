"""CIFAR-style ResNet (He et al., "Deep Residual Learning", arXiv 1512.03385, section 4.2).

A ``6n + 2``-layer network: a 3x3 stem convolution to ``width`` channels, three stages of
``n`` basic blocks with ``width, 2 width, 4 width`` channels (stages 2 and 3 start with
stride 2), global average pooling and a linear classifier. A basic block computes
``y = act(BN(conv(act(BN(conv(x))))) + s(x))`` with ``s`` the identity, or a 1x1 strided
convolution + BN where the shape changes (option B of the paper). ``depth=8`` (n=1) and
``width=16`` give ~78k parameters, small enough for CPU experiments; ``depth=20`` is the
paper's ResNet-20.

``blocks`` overrides ``depth`` with an explicit number of blocks per stage, stage ``i`` at
``width * 2**i`` channels: ``blocks=(2, 2, 2, 2), width=64`` is the CIFAR ResNet-18 (Kuang
Liu's ``ResNet18`` layout used by SAM/GAM code), ``blocks=(4, 4, 4), width=160`` has
WRN-28-10's depth and widths (post-activation, no dropout: not Zagoruyko & Komodakis' exact
pre-activation block).

BatchNorm makes outputs depend on the batch in training mode; measure curvature in eval mode
(flatlab.curvature's default). Each activation is its own module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from flatlab._checks import check_positive_int
from flatlab.models.activations import ActivationSpec, make_activation
from flatlab.models.cnn import _image_shape

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: ActivationSpec) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = make_activation(activation)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))  # (B, c_out, H/s, W/s)
        h = self.bn2(self.conv2(h))  # (B, c_out, H/s, W/s)
        return self.act2(h + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with BatchNorm.

    Args:
        input_shape: ``(C, H, W)``, e.g. ``(3, 32, 32)``.
        num_classes: outputs.
        depth: ``6n + 2`` (8, 14, 20, 32, ...).
        width: channels of the first stage.
        activation: name or module class.
        blocks: blocks per stage (overrides ``depth``), e.g. ``(2, 2, 2, 2)`` for ResNet-18.

    Example:
        >>> ResNet((3, 32, 32), 10, depth=8, width=4)(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        depth: int = 8,
        width: int = 16,
        activation: ActivationSpec = "relu",
        blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        c_in, _, _ = self.input_shape = _image_shape(input_shape)
        check_positive_int("num_classes", num_classes)
        check_positive_int("depth", depth)
        check_positive_int("width", width)
        if blocks is None:
            if depth < 8 or (depth - 2) % 6:
                raise ValueError(f"depth must be 6n + 2 with n >= 1 (8, 14, 20, ...), got {depth}")
            blocks = (depth - 2) // 6, (depth - 2) // 6, (depth - 2) // 6
        blocks = tuple(blocks)
        if not blocks or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                             for b in blocks):
            raise ValueError(f"blocks must be a non-empty tuple of positive ints, got {blocks}")
        self.stem = nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), make_activation(activation))
        layers: list[nn.Module] = []
        c = width
        for stage, n in enumerate(blocks):
            c_out = width * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(c, c_out, stride, activation))
                c = c_out
        self.blocks = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)  # (B, width, H, W)
        h = self.blocks(h)  # (B, width 2^(S-1), H / 2^(S-1), W / 2^(S-1)), S stages
        return self.classifier(h.mean(dim=(2, 3)))  # (B, C_last) -> (B, num_classes)
