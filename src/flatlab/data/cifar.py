"""CIFAR-10 and CIFAR-100 from the python pickle batches on disk (never downloaded).

Layout (as unpacked from the official ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``):
``root/cifar-10-batches-py/{data_batch_1..5, test_batch}`` and
``root/cifar-100-python/{train, test}``; ``root`` may also be that folder itself. Each pickle is
a dict (bytes keys) with ``data``: uint8 ``(n, 3072)`` (1024 red, 1024 green, 1024 blue values,
row-major 32x32) and ``labels`` (CIFAR-10) or ``fine_labels`` / ``coarse_labels`` (CIFAR-100).

Images become float32 ``(N, 3, 32, 32)``: ``x / 255``, then, if ``normalize``, standardised per
channel with the *training* set's mean and standard deviation (computed from the files, so no
constants are assumed). The official test batch is the test split; ``val_fraction`` of the
training set is held out with a seeded permutation.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from flatlab._checks import check_choice
from flatlab.data.splits import Splits, split_indices, subset

__all__ = ["cifar10", "cifar100", "read_cifar_batch"]


def read_cifar_batch(
    path: str | os.PathLike, label_key: str = "labels"
) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch as ``(uint8 (n, 3, 32, 32), int64 (n,))``.

    Raises:
        FileNotFoundError: if the file is missing.
        KeyError: if the batch lacks ``data`` or ``label_key``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR batch not found: {path}")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise KeyError(f"{path}: CIFAR batch must have key {key!r}, got {sorted(batch)}")
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    return data, labels


def _folder(root: str | os.PathLike, sub: str) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR data directory not found: {root}")
    return root if root.name == sub else root / sub


def _load(files: list[Path], test_file: Path, label_key: str, num_classes: int, name: str,
          seed: int, val_fraction: float, normalize: bool) -> Splits:
    parts = [read_cifar_batch(f, label_key) for f in files]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = read_cifar_batch(test_file, label_key)
    xtr = torch.from_numpy(x_train.astype(np.float32) / 255.0)  # (N, 3, 32, 32)
    xte = torch.from_numpy(x_test.astype(np.float32) / 255.0)
    if normalize:
        mean = xtr.mean(dim=(0, 2, 3), keepdim=True)  # (1, 3, 1, 1)
        std = xtr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    train_all = (xtr, torch.from_numpy(y_train))
    val_idx, train_idx = split_indices(xtr.shape[0], (val_fraction,), seed)
    return Splits(subset(train_all, train_idx), subset(train_all, val_idx),
                  (xte, torch.from_numpy(y_test)), num_classes=num_classes,
                  input_shape=(3, 32, 32), name=name)


def cifar10(root: str | os.PathLike, seed: int = 0, val_fraction: float = 0.1,
            normalize: bool = True) -> Splits:
    """CIFAR-10 from ``root/cifar-10-batches-py`` as :class:`Splits` (10 classes)."""
    d = _folder(root, "cifar-10-batches-py")
    return _load([d / f"data_batch_{i}" for i in range(1, 6)], d / "test_batch", "labels", 10,
                 "cifar10", seed, val_fraction, normalize)


def cifar100(root: str | os.PathLike, seed: int = 0, val_fraction: float = 0.1,
             normalize: bool = True, labels: str = "fine") -> Splits:
    """CIFAR-100 from ``root/cifar-100-python``; ``labels`` "fine" (100) or "coarse" (20)."""
    check_choice("labels", labels, ("fine", "coarse"))
    d = _folder(root, "cifar-100-python")
    return _load([d / "train"], d / "test", f"{labels}_labels", 100 if labels == "fine" else 20,
                 "cifar100", seed, val_fraction, normalize)
