"""Small convolutional networks: DomainBed's MNIST CNN, a digits CNN and a 1-D CNN.

**MNISTCNN** (DomainBed's ``MNIST_CNN``, Gulrajani & Lopez-Paz, arXiv 2007.01434): four 3x3
convolutions with channels ``(64, 128, 128, 128)``, the second with stride 2, each followed by
the activation and ``GroupNorm(groups, C)``; global average pooling to ``C_last`` features and a
linear classifier (DomainBed's ERM network: ``MNIST_CNN`` featurizer, 128 features, and
``Classifier`` = ``nn.Linear(128, num_classes)``; the defaults reproduce it exactly, 371,850
parameters at ``(1, 28, 28)``, checked against a transcription of DomainBed's ``networks.py``
in tests/models/test_mnist_cnn.py). GroupNorm (not BatchNorm) keeps the per-example loss
independent of the batch, which per-domain gradients (DGSAM) and Hessian measurements rely on.

**SmallCNN** (for 8x8 / 16x16 digits): ``conv3x3(c1) -> act -> conv3x3(c2, stride 2) -> act ->
global average pool -> linear``.

**CNN1d** (for MNIST-1D, length-40 signals, after the MNIST-1D paper's baseline): three
1-D convolutions (kernel 5, stride 2, padding 2) with the activation between them, flattened
into a linear classifier. Inputs ``(B, L)`` are treated as one channel, ``(B, C, L)`` as C.

Every activation is its own module (hooks and ``flatlab.sparsity.sparsify`` find them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from flatlab._checks import check_positive_int
from flatlab.models.activations import ActivationSpec, make_activation

__all__ = ["CNN1d", "MNISTCNN", "SmallCNN"]


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (H, W), got {tuple(input_shape)}")
    return shape  # type: ignore[return-value]


def _channels(name: str, channels: Sequence[int], n: int | None = None) -> tuple[int, ...]:
    out = tuple(channels)
    if not out or (n is not None and len(out) != n):
        raise ValueError(f"{name} must have {n or 'at least 1'} entries, got {out}")
    for i, c in enumerate(out):
        check_positive_int(f"{name}[{i}]", c)
    return out


class MNISTCNN(nn.Module):
    """DomainBed's MNIST CNN with GroupNorm.

    Args:
        input_shape: ``(C, H, W)``, e.g. ``(1, 28, 28)`` (RotatedMNIST) or ``(2, 28, 28)``
            (ColoredMNIST).
        num_classes: outputs.
        channels: four conv widths (default DomainBed's ``(64, 128, 128, 128)``).
        groups: GroupNorm groups (must divide every width; default 8).
        activation: name or module class.

    Example:
        >>> MNISTCNN((2, 14, 14), 2, channels=(8, 16, 16, 16))(torch.zeros(3, 2, 14, 14)).shape
        torch.Size([3, 2])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        channels: Sequence[int] = (64, 128, 128, 128),
        groups: int = 8,
        activation: ActivationSpec = "relu",
    ) -> None:
        super().__init__()
        c_in, _, _ = self.input_shape = _image_shape(input_shape)
        check_positive_int("num_classes", num_classes)
        chans = _channels("channels", channels, 4)
        check_positive_int("groups", groups)
        bad = [c for c in chans if c % groups]
        if bad:
            raise ValueError(f"groups must divide every channel count, got groups={groups} and "
                             f"channels {chans}")
        layers: list[nn.Module] = []
        for i, c in enumerate(chans):
            layers += [nn.Conv2d(c_in, c, 3, stride=2 if i == 1 else 1, padding=1),
                       make_activation(activation), nn.GroupNorm(groups, c)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(chans[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)  # (B, C_last, H/2, W/2)
        h = self.pool(h).flatten(1)  # (B, C_last)
        return self.classifier(h)  # (B, num_classes)


class SmallCNN(nn.Module):
    """A two-convolution CNN for tiny images such as 8x8 digits.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: outputs.
        channels: the two conv widths (default ``(16, 32)``).
        activation: name or module class.

    Example:
        >>> SmallCNN((1, 8, 8), 10)(torch.zeros(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
        channels: Sequence[int] = (16, 32),
        activation: ActivationSpec = "relu",
    ) -> None:
        super().__init__()
        c_in, _, _ = self.input_shape = _image_shape(input_shape)
        check_positive_int("num_classes", num_classes)
        c1, c2 = _channels("channels", channels, 2)
        self.features = nn.Sequential(
            nn.Conv2d(c_in, c1, 3, padding=1), make_activation(activation),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), make_activation(activation),
        )
        self.classifier = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
        h = self.features(x)  # (B, c2, ceil(H/2), ceil(W/2))
        return self.classifier(h.mean(dim=(2, 3)))  # (B, c2) -> (B, num_classes)


class CNN1d(nn.Module):
    """A 1-D CNN for MNIST-1D: three strided convolutions and a linear classifier.

    Args:
        input_shape: ``(L,)`` (one channel) or ``(C, L)``; MNIST-1D is ``(40,)``.
        num_classes: outputs.
        channels: conv widths (default ``(32, 32, 32)``).
        kernel_size: odd kernel size (padding keeps ``ceil(L / 2)`` per stride-2 layer).
        activation: name or module class.

    Example:
        >>> CNN1d((40,), 10)(torch.zeros(2, 40)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (40,),
        num_classes: int = 10,
        channels: Sequence[int] = (32, 32, 32),
        kernel_size: int = 5,
        activation: ActivationSpec = "relu",
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 1:
            shape = (1, *shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"input_shape must be (L,) or (C, L), got {tuple(input_shape)}")
        check_positive_int("num_classes", num_classes)
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        chans = _channels("channels", channels)
        self.input_shape = shape
        c_in, length = shape
        layers: list[nn.Module] = []
        for i, c in enumerate(chans):
            layers.append(nn.Conv1d(c_in, c, kernel_size, stride=2, padding=kernel_size // 2))
            if i < len(chans) - 1:
                layers.append(make_activation(activation))
            c_in, length = c, (length + 1) // 2
        self.features = nn.Sequential(*layers)
        self.act = make_activation(activation)
        self.classifier = nn.Linear(c_in * length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)  # (B, L) -> (B, 1, L)
        h = self.features(x)  # (B, C_last, L / 2^depth)
        return self.classifier(self.act(h).flatten(1))  # (B, C_last * L') -> (B, num_classes)
