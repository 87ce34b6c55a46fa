"""MNIST and Fashion-MNIST from IDX files on disk (gzipped or raw; never downloaded).

IDX format (LeCun et al.): a big-endian header ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 sizes, then the array in C order. Dtype codes: 0x08 uint8, 0x09 int8,
0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.

:func:`mnist` looks for the four standard files, ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each
optionally ``.gz``), in ``root``, ``root/<name>/raw`` (torchvision's layout) or ``root/<name>``.
Images become float32 ``(N, 1, 28, 28)`` in [0, 1] (``x / 255``), labels int64 ``(N,)``. The
official test set is the test split; ``val_fraction`` of the training set is held out for
validation with a seeded permutation.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from flatlab.data.splits import Splits, split_indices, subset

__all__ = ["fashion_mnist", "find_idx_file", "mnist", "read_idx"]

_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {
    "train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` is decompressed) into a numpy array in native byte order.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for a bad magic number, an unknown dtype code or a truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file: magic must start with two zero bytes, got "
                         f"{raw[:4].hex()}")
    code, ndim = raw[2], raw[3]
    if code not in _DTYPES:
        raise ValueError(f"{path}: IDX dtype code must be one of "
                         f"{', '.join(hex(c) for c in _DTYPES)}, got {hex(code)}")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_DTYPES[code])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(f"{path}: IDX header promises {expected} data bytes for shape {shape}, "
                         f"got {len(raw) - offset}")
    data = np.frombuffer(raw, dtype, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def find_idx_file(root: Path, stem: str, name: str) -> Path:
    """The first of ``<dir>/<stem>[.gz]`` over the folders :func:`mnist` searches."""
    dirs = [root, root / name / "raw", root / name]
    for d in dirs:
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{name}: {stem}[.gz] not found in any of {', '.join(str(d) for d in dirs)}"
    )


def _idx_splits(root: str | os.PathLike, name: str, seed: int, val_fraction: float) -> Splits:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name} data directory not found: {root}")
    arrays = {k: read_idx(find_idx_file(root, stem, name)) for k, stem in _FILES.items()}

    def pair(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(arrays[f"{split}_x"].astype(np.float32) / 255.0).unsqueeze(1)
        y = torch.from_numpy(arrays[f"{split}_y"].astype(np.int64))  # (N,)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{name} {split}: {x.shape[0]} images but {y.shape[0]} labels")
        return x, y  # (N, 1, 28, 28), (N,)

    train_all = pair("train")
    val_idx, train_idx = split_indices(train_all[0].shape[0], (val_fraction,), seed)
    test = pair("test")
    return Splits(subset(train_all, train_idx), subset(train_all, val_idx), test,
                  num_classes=10, input_shape=tuple(test[0].shape[1:]), name=name)


def mnist(root: str | os.PathLike, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """MNIST from IDX files under ``root`` as :class:`Splits` (10 classes, ``(1, 28, 28)``)."""
    return _idx_splits(root, "MNIST", seed, val_fraction)


def fashion_mnist(root: str | os.PathLike, seed: int = 0, val_fraction: float = 0.1) -> Splits:
    """Fashion-MNIST from IDX files under ``root`` (same layout and format as MNIST)."""
    return _idx_splits(root, "FashionMNIST", seed, val_fraction)
