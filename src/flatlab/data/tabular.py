"""scikit-learn's bundled 8x8 handwritten digits (no download), optionally upsampled to 16x16.

The UCI "Optical Recognition of Handwritten Digits" test set ships inside scikit-learn:
1,797 grayscale images of the digits 0-9, 8x8 pixels with integer intensities 0..16.
:func:`digits` scales them to [0, 1] (``x / 16``) and returns images of shape
``(N, 1, size, size)``; with ``size=16`` they are upsampled by bilinear interpolation
(``torch.nn.functional.interpolate``, ``align_corners=False``) so that rotations and small CNNs
have room to work. An MLP flattens them (``flatlab.models.MLP`` does so itself).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from flatlab._checks import check_choice
from flatlab.data.splits import Splits, train_val_test_split

__all__ = ["digits", "digits_images"]


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's arrays, parsed once per process (read-only; callers copy)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)  # (1797, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def digits_images(size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: ``x`` float32 ``(1797, 1, size, size)`` in [0, 1], ``y`` int64."""
    check_choice("size", size, (8, 16))
    images, labels = _load_digits()
    x = torch.from_numpy(images / 16.0).unsqueeze(1)  # (N, 1, 8, 8), a fresh tensor per call
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)  # (N, 1, size, size)
    y = torch.from_numpy(labels.copy())
    return x.contiguous(), y


def digits(
    size: int = 8, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> Splits:
    """scikit-learn's digits as :class:`Splits` (10 classes, input shape ``(1, size, size)``).

    Args:
        size: 8 (native) or 16 (bilinear upsampling).
        seed: seed of the split permutation.
        val_fraction, test_fraction: fractions held out (rounded down).

    Example:
        >>> s = digits(size=8, seed=0)
        >>> s.train[0].shape[1:], s.num_classes
        (torch.Size([1, 8, 8]), 10)
    """
    train, val, test = train_val_test_split(
        digits_images(size), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    return Splits(train, val, test, num_classes=10, input_shape=(1, size, size),
                  name=f"digits{size}")
