"""One way to read "data" everywhere in flatlab.

Measurements (curvature, sharpness, sparsity) and the training loop accept data as

* a pair of tensors ``(inputs, targets)`` (one batch: the full-batch quantity),
* a list or tuple of such pairs (several batches, possibly of unequal size),
* any iterable of pairs, e.g. a ``torch.utils.data.DataLoader`` (re-iterated on every pass).

:func:`batches` yields ``(inputs, targets, size)`` with ``size`` the leading dimension of
``inputs``, so callers can weight a mean over batches by batch size, which is what the
full-data mean loss requires: ``L = sum_b n_b L_b / sum_b n_b``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

Batch = tuple[Any, torch.Tensor]
Data = Batch | Iterable[Batch]


def _is_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    )


def _size(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.dim() > 0 else 1
    if isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], torch.Tensor):
        return int(inputs[0].shape[0])
    raise TypeError(
        f"batch inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}"
    )


def batches(
    data: Data, device: torch.device | None = None
) -> Iterator[tuple[Any, torch.Tensor, int]]:
    """Yield ``(inputs, targets, batch_size)`` for every batch of ``data``.

    Args:
        data: a tensor pair, a list of tensor pairs, or an iterable (DataLoader) of pairs.
        device: if given, tensors are moved there.

    Raises:
        ValueError: if ``data`` holds no batch, or a batch is empty.
        TypeError: if a batch is not an ``(inputs, targets)`` pair.
    """
    items = [data] if _is_pair(data) else data
    if isinstance(items, torch.Tensor) or not isinstance(items, Iterable):
        raise TypeError(
            "data must be an (inputs, targets) tensor pair, a list of pairs or a DataLoader, "
            f"got {type(data).__name__}"
        )
    count = 0
    for batch in items:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
            )
        inputs, targets = batch[0], batch[1]
        n = _size(inputs)
        if n == 0:
            raise ValueError("data contains an empty batch (size 0)")
        if device is not None:
            inputs = _to(inputs, device)
            targets = targets.to(device)
        count += 1
        yield inputs, targets, n
    if count == 0:
        raise ValueError("data is empty: it yielded no batch")


def _to(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    return type(inputs)(t.to(device) for t in inputs)


def total_size(data: Data) -> int:
    """Number of examples in ``data`` (one pass over it)."""
    return sum(n for _, _, n in batches(data))
