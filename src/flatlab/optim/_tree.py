"""Functional core of flatlab.optim: operations on lists of tensors, no classes, no state.

Every sharpness-aware optimizer (SAM, ASAM, USAM, GAM, DGSAM, SAGM) is written in terms of
these few operations, so norms, perturbations and restores exist exactly once. They use the
``torch._foreach_*`` kernels (one launch per device/dtype group instead of one per tensor);
tests check them against a plain per-tensor loop in float64.

Shapes: ``tensors`` is a list of tensors of arbitrary shapes (one per parameter); a "tree"
here is just such a list, aligned index by index with the parameter list.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TensorList = Sequence[torch.Tensor]


def global_norm(tensors: TensorList, p: float = 2.0) -> torch.Tensor:
    """Return ``(sum_i ||t_i||_p^p)^(1/p)``, the p-norm of all tensors concatenated (0-d tensor).

    Computed in float32 or higher (float64 stays float64). An empty list gives 0.
    """
    if len(tensors) == 0:
        return torch.zeros(())
    norms = torch._foreach_norm(list(tensors), p)
    first = norms[0]
    if all(n.dtype == first.dtype and n.device == first.device for n in norms):
        stacked = torch.stack(norms)  # the common case: one stack, one cast
        stacked = stacked.to(torch.promote_types(stacked.dtype, torch.float32))
    else:  # mixed dtypes or devices (model parallel): gather on the first tensor's device
        stacked = torch.stack(
            [n.to(first.device, torch.promote_types(n.dtype, torch.float32)) for n in norms]
        )
    if p == float("inf"):
        return stacked.max()
    return torch.linalg.vector_norm(stacked, p)


def snapshot(tensors: TensorList) -> list[torch.Tensor]:
    """Return detached copies of ``tensors`` (the saved point that a perturbation is undone to)."""
    return [t.detach().clone() for t in tensors]


def restore_(dst: TensorList, saved: TensorList) -> None:
    """Copy ``saved`` back into ``dst`` in place: undo a perturbation exactly (no subtraction)."""
    with torch.no_grad():
        torch._foreach_copy_(list(dst), list(saved))


def add_scaled_(dst: TensorList, src: TensorList, alpha: float | torch.Tensor) -> None:
    """``dst_i += alpha * src_i`` in place, for a Python or 0-d tensor ``alpha``."""
    with torch.no_grad():
        if isinstance(alpha, torch.Tensor):
            torch._foreach_add_(list(dst), torch._foreach_mul(list(src), alpha))
        else:
            torch._foreach_add_(list(dst), list(src), alpha=alpha)


def all_finite(tensors: TensorList) -> bool:
    """True when every entry of every tensor is finite (one host sync)."""
    if len(tensors) == 0:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
