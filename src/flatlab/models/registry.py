"""``flatlab.models.build(name, input_shape, num_classes, **kw)``: every model by name.

An explicit dict (:data:`MODELS`, no ``globals()`` lookups) maps a config name to a builder
taking ``(input_shape, num_classes, **kw)``; the keyword arguments go to the model class.
The MLPs take ``in_dim = prod(input_shape)`` (inputs are flattened) and ``out_dim =
num_classes``.

======================  =========================================================
name                    model
======================  =========================================================
``mlp``                 :class:`~flatlab.models.mlp.MLP`
``residual_mlp``        :class:`~flatlab.models.mlp.ResidualMLP` (pre-LayerNorm)
``mnist_cnn``           :class:`~flatlab.models.cnn.MNISTCNN` (DomainBed, GroupNorm)
``small_cnn``           :class:`~flatlab.models.cnn.SmallCNN` (digits)
``cnn1d``               :class:`~flatlab.models.cnn.CNN1d` (MNIST-1D)
``resnet``              :class:`~flatlab.models.resnet.ResNet` (CIFAR, BatchNorm)
``resnet18``            :class:`~flatlab.models.imagenet_resnet.ImageNetResNet` (ImageNet,
                        torchvision's layout; also ``resnet34``, ``resnet50``, ``resnet101``)
``vit``                 :class:`~flatlab.models.vit.ViT`
``mixer``               :class:`~flatlab.models.mixer.Mixer`
======================  =========================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn as nn

from flatlab._checks import check_positive_int
from flatlab.models.cnn import MNISTCNN, CNN1d, SmallCNN
from flatlab.models.imagenet_resnet import ARCHITECTURES, ImageNetResNet
from flatlab.models.mixer import Mixer
from flatlab.models.mlp import MLP, ResidualMLP
from flatlab.models.resnet import ResNet
from flatlab.models.vit import ViT

__all__ = ["MODELS", "build"]


def _flat(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def make(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Module:
        return cls(math.prod(input_shape), num_classes, **kw)

    make.__doc__ = f"{cls.__name__}(prod(input_shape), num_classes, **kw)"
    return make


def _imagenet(arch: str) -> Callable[..., nn.Module]:
    def make(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Module:
        return ImageNetResNet(tuple(input_shape), num_classes, arch=arch, **kw)

    make.__doc__ = f"ImageNetResNet(input_shape, num_classes, arch={arch!r}, **kw)"
    return make


def _shaped(cls: type[nn.Module]) -> Callable[..., nn.Module]:
    def make(input_shape: Sequence[int], num_classes: int, **kw: Any) -> nn.Module:
        return cls(tuple(input_shape), num_classes, **kw)

    make.__doc__ = f"{cls.__name__}(input_shape, num_classes, **kw)"
    return make


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _flat(MLP),
    "residual_mlp": _flat(ResidualMLP),
    "mnist_cnn": _shaped(MNISTCNN),
    "small_cnn": _shaped(SmallCNN),
    "cnn1d": _shaped(CNN1d),
    "resnet": _shaped(ResNet),
    "vit": _shaped(ViT),
    "mixer": _shaped(Mixer),
    **{arch: _imagenet(arch) for arch in ARCHITECTURES},
}


def build(name: str, input_shape: Sequence[int], num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` for inputs of ``input_shape`` and ``num_classes``.

    Example:
        >>> build("mlp", (1, 8, 8), 10, width=32, depth=1).layers[0].in_features
        64

    Raises:
        ValueError: for an unknown name (the message lists the known ones) or a bad shape.
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {', '.join(map(repr, MODELS))}, got {name!r}")
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {shape}")
    check_positive_int("num_classes", num_classes)
    return MODELS[name](shape, num_classes, **kwargs)
