"""ImageNet ResNet-18 / ResNet-50 (He et al., arXiv 1512.03385, Table 1), DomainBed's backbone.

The layout and parameter names are torchvision's (``conv1, bn1, layer1 ... layer4, fc``;
blocks ``conv1/bn1/conv2/bn2[/conv3/bn3]`` and ``downsample.0`` (1x1 conv) /
``downsample.1`` (BN)), so an ImageNet checkpoint saved by torchvision
(``resnet18-f37072fd.pth``, ``resnet50-0676ba61.pth``, or any ``state_dict`` of that
layout) loads with :func:`load_pretrained` without torchvision being installed:

* stem: 7x7 stride-2 convolution to 64 channels, BN, ReLU, 3x3 stride-2 max-pool;
* four stages of ``layers`` blocks with ``64, 128, 256, 512`` base channels (stages 2-4 start
  with stride 2). A basic block (ResNet-18/34) is ``act(BN(conv3(act(BN(conv3(x))))) + s(x))``;
  a bottleneck (ResNet-50/101/152, expansion 4) is 1x1 -> 3x3 (the stride, "v1.5" as
  torchvision) -> 1x1 to 4x the base channels; the shortcut ``s`` is the identity or a strided
  1x1 convolution + BN where the shape changes;
* global average pooling, dropout (DomainBed's ``resnet_dropout``), linear classifier ``fc``.

ResNet-18 has 11,689,512 parameters and ResNet-50 25,557,032 at 1,000 classes, as torchvision's.
DomainBed (``networks.ResNet``) freezes every BatchNorm during training (``freeze_bn``: BN
layers stay in eval mode, using the pretrained running statistics) and replaces ``fc`` by
its own classifier; here ``fc`` *is* that classifier, re-initialised by
:func:`load_pretrained` when its shape differs from the checkpoint's (1,000 ImageNet
classes). Inputs are ``(B, C, H, W)`` with ``C = input_shape[0]``; a checkpoint's 3-channel
stem is cycled over other channel counts as DomainBed does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from flatlab._checks import check_positive_int
from flatlab.models.activations import ActivationSpec, make_activation
from flatlab.models.cnn import _image_shape

__all__ = ["ARCHITECTURES", "Bottleneck", "ImageNetBasicBlock", "ImageNetResNet",
           "LoadedWeights", "load_pretrained"]

#: blocks per stage and block type of each named depth (He et al., Table 1)
ARCHITECTURES: dict[str, tuple[tuple[int, ...], str]] = {
    "resnet18": ((2, 2, 2, 2), "basic"), "resnet34": ((3, 4, 6, 3), "basic"),
    "resnet50": ((3, 4, 6, 3), "bottleneck"), "resnet101": ((3, 4, 23, 3), "bottleneck"),
}


def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(c_out))


class ImageNetBasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and the shortcut (torchvision's ``BasicBlock`` names)."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, activation: ActivationSpec) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = make_activation(activation)
        self.downsample = _downsample(c_in, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        h = self.bn2(self.conv2(h))
        return self.act2(h + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 conv-BN to ``4 planes`` channels and the shortcut."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, activation: ActivationSpec) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = make_activation(activation)
        self.conv3 = nn.Conv2d(planes, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.act3 = make_activation(activation)
        self.downsample = _downsample(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(self.conv1(x)))  # (B, planes, H, W)
        h = self.act2(self.bn2(self.conv2(h)))  # (B, planes, H/s, W/s)
        h = self.bn3(self.conv3(h))  # (B, 4 planes, H/s, W/s)
        return self.act3(h + (x if self.downsample is None else self.downsample(x)))


class ImageNetResNet(nn.Module):
    """ImageNet ResNet with torchvision's parameter names, DomainBed's dropout and frozen BN.

    Args:
        input_shape: ``(C, H, W)``; any ``H, W >= 1`` (global pooling), 224 in DomainBed.
        num_classes: outputs of ``fc``.
        arch: a key of :data:`ARCHITECTURES` (``"resnet18"``, ``"resnet50"``, ...).
        dropout: dropout probability before ``fc`` (DomainBed's ``resnet_dropout``).
        freeze_bn: keep every BatchNorm in eval mode, also under ``model.train()``.
        activation: name or module class of every nonlinearity.

    Example:
        >>> m = ImageNetResNet((3, 32, 32), 7, arch="resnet18")
        >>> m(torch.zeros(2, 3, 32, 32)).shape, m.fc.in_features
        (torch.Size([2, 7]), 512)
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 224, 224),
        num_classes: int = 1000,
        arch: str = "resnet50",
        dropout: float = 0.0,
        freeze_bn: bool = False,
        activation: ActivationSpec = "relu",
    ) -> None:
        super().__init__()
        c_in, _, _ = self.input_shape = _image_shape(input_shape)
        check_positive_int("num_classes", num_classes)
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(map(repr, ARCHITECTURES))}, "
                             f"got {arch!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.arch, self.freeze_bn = arch, bool(freeze_bn)
        layers, kind = ARCHITECTURES[arch]
        block = ImageNetBasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(c_in, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = make_activation(activation)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c = 64
        for stage, n in enumerate(layers):
            planes = 64 * 2**stage
            blocks = []
            for i in range(n):
                blocks.append(block(c, planes, 2 if stage > 0 and i == 0 else 1, activation))
                c = planes * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def train(self, mode: bool = True) -> ImageNetResNet:
        """As ``nn.Module.train``; with ``freeze_bn`` every BatchNorm stays in eval mode."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features ``(B, 512)`` (ResNet-18/34) or ``(B, 2048)`` (50/101)."""
        h = self.maxpool(self.act(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))  # (B, c, H/32, W/32)
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))  # (B, num_classes)


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_pretrained` did: tensors copied, and keys left at their initialisation."""

    loaded: int
    kept: tuple[str, ...]


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in ("state_dict", "model"):  # Lightning / flatlab-style checkpoints
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"pretrained file must hold a state_dict of tensors, got {path}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def load_pretrained(model: ImageNetResNet, path: str | os.PathLike) -> LoadedWeights:
    """Copy the weights of a torchvision-layout ``state_dict`` file into ``model`` in place.

    Every tensor of the file must match one of ``model`` by name and shape, except:

    * ``fc.weight`` / ``fc.bias`` of another shape (the 1,000 ImageNet classes) are skipped
      and ``fc`` keeps its fresh initialisation, as DomainBed's new classifier;
    * a 3-channel ``conv1.weight`` is cycled over a model with ``C != 3`` input channels
      (channel ``i`` takes the checkpoint's channel ``i mod 3``), as DomainBed does.

    Prefixes ``module.`` (DDP) and wrappers ``{"state_dict": ...}`` / ``{"model": ...}`` are
    removed. The file is read with ``weights_only=True`` (no code runs).

    Returns:
        :class:`LoadedWeights`: the number of tensors copied and the keys left as initialised.

    Raises:
        FileNotFoundError: naming a missing file.
        ValueError: naming the first missing, unexpected or mis-shaped key.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of a file that is no torch save
        raise ValueError(f"pretrained file must be a torch.save'd state_dict, got {path}: "
                         f"{err}") from err
    theirs = _state_dict_of(obj, path)
    ours = model.state_dict()
    missing = [k for k in ours if k not in theirs]
    unexpected = [k for k in theirs if k not in ours]
    for name, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"pretrained file {path} does not fit {model.arch}: {name} key "
                             f"{keys[0]!r}{more}")
    new, kept = {}, []
    for key, mine in ours.items():
        value = theirs[key]
        if key == "conv1.weight" and value.shape[1] == 3 and mine.shape[1] != 3:
            value = value[:, [i % 3 for i in range(mine.shape[1])]]
        if key.startswith("fc.") and value.shape != mine.shape:
            kept.append(key)
            continue
        if value.shape != mine.shape:
            raise ValueError(f"pretrained file {path} does not fit {model.arch}: {key!r} has "
                             f"shape {tuple(value.shape)}, the model {tuple(mine.shape)}")
        new[key] = value.to(mine.dtype)
    with torch.no_grad():
        for key, value in new.items():
            ours[key].copy_(value)
    return LoadedWeights(loaded=len(new), kept=tuple(kept))
