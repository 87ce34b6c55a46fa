"""Deterministic splits of a tensor dataset, and the :class:`Splits` record every loader returns.

A dataset is a pair ``(x, y)``: ``x`` of shape ``(N, *input_shape)`` (float32) and ``y`` of
shape ``(N,)`` (int64 class labels) or ``(N, out_dim)`` (float32 regression targets).

Splits are drawn from a seeded permutation, ``perm = randperm(N, generator=Generator(seed))``,
so the same seed always gives the same indices, on every machine, regardless of the global
torch RNG (which is neither read nor advanced). Split sizes are rounded down for the held-out
parts, ``n_test = floor(test_fraction * N)``, ``n_val = floor(val_fraction * N)``, and the
training part takes the rest, so no example is lost or repeated.

DomainBed's per-domain "in/out" split (``holdout_fraction=0.2``: 80% to train on, 20% for
model selection) is :func:`in_out_split`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flatlab._checks import check_in_range

Pair = tuple[torch.Tensor, torch.Tensor]

__all__ = ["Pair", "Splits", "split_indices", "train_val_test_split", "in_out_split", "subset"]


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset split three ways.

    Attributes:
        train, val, test: ``(x, y)`` tensor pairs; ``x`` is ``(n, *input_shape)`` float32,
            ``y`` is ``(n,)`` int64 for classification or ``(n, out_dim)`` float32 for
            regression. ``val`` or ``test`` may hold 0 examples when asked for.
        num_classes: number of classes, or ``None`` for a regression dataset.
        input_shape: shape of one input, e.g. ``(1, 8, 8)`` or ``(40,)``.
        name: a short name, e.g. ``"digits8"``.

    Frozen, compared by identity (``==`` on tensors has no single truth value).
    """

    train: Pair
    val: Pair
    test: Pair
    num_classes: int | None
    input_shape: tuple[int, ...]
    name: str

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return "regression" if self.num_classes is None else "classification"

    @property
    def out_dim(self) -> int:
        """Width of a model's output layer: the number of classes, or the target dimension."""
        if self.num_classes is not None:
            return self.num_classes
        y = self.train[1]
        return 1 if y.dim() == 1 else int(y.shape[1])

    @property
    def in_dim(self) -> int:
        """Number of input features, ``prod(input_shape)`` (what an MLP takes)."""
        return math.prod(self.input_shape)

    def sizes(self) -> dict[str, int]:
        """Number of examples per split."""
        return {k: int(getattr(self, k)[0].shape[0]) for k in ("train", "val", "test")}


def _check_pair(name: str, data: Pair) -> Pair:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(f"{name} must be an (x, y) tensor pair, got {type(data).__name__}")
    x, y = data
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        got = f"({type(x).__name__}, {type(y).__name__})"
        raise TypeError(f"{name} must hold two tensors, got {got}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name} inputs and targets must have the same length, got {x.shape[0]} and "
            f"{y.shape[0]}"
        )
    return x, y


def subset(data: Pair, index: torch.Tensor) -> Pair:
    """The examples of ``data`` at ``index`` (a 1-D LongTensor)."""
    x, y = _check_pair("data", data)
    return x[index], y[index]


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Split ``range(n)`` into ``len(fractions) + 1`` disjoint index sets from a seeded permutation.

    Part ``i`` (for ``i < len(fractions)``) gets ``floor(fractions[i] * n)`` indices; the last
    part gets the rest. Indices are sorted within each part.

    Raises:
        ValueError: if a fraction is outside [0, 1) or they sum to 1 or more.
    """
    for i, f in enumerate(fractions):
        check_in_range(f"fractions[{i}]", f, 0.0, 1.0)
    if sum(fractions) >= 1.0:
        raise ValueError(f"fractions must sum to < 1, got {fractions} (sum {sum(fractions)})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    parts, start = [], 0
    for f in fractions:
        k = int(math.floor(f * n))
        parts.append(perm[start : start + k].sort().values)
        start += k
    parts.append(perm[start:].sort().values)
    return parts


def train_val_test_split(
    data: Pair, *, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Pair, Pair, Pair]:
    """Split ``data`` into train / val / test pairs (sizes: rest, floor(val*N), floor(test*N))."""
    x, y = _check_pair("data", data)
    test_idx, val_idx, train_idx = split_indices(x.shape[0], (test_fraction, val_fraction), seed)
    return subset(data, train_idx), subset(data, val_idx), subset(data, test_idx)


def in_out_split(data: Pair, *, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[Pair, Pair]:
    """DomainBed's split of one domain: ``(in, out)`` with ``floor(holdout_fraction * N)`` out."""
    x, _ = _check_pair("data", data)
    out_idx, in_idx = split_indices(x.shape[0], (holdout_fraction,), seed)
    return subset(data, in_idx), subset(data, out_idx)
