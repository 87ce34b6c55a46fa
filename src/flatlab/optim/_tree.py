"""Functional core of flatlab.optim: operations on lists of tensors, no classes, no state.

Every sharpness-aware optimizer (SAM, ASAM, USAM, GAM, DGSAM, SAGM) is written in terms of
these few operations, so norms, perturbations and restores exist exactly once. They use the
``torch._foreach_*`` kernels (one launch per device/dtype group instead of one per tensor);
tests check them against a plain per-tensor loop in float64.

Shapes: ``tensors`` is a list of tensors of arbitrary shapes (one per parameter); a "tree"
here is just such a list, aligned index by index with the parameter list.

Sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``): the tensors are DTensors
sharded over a 1-D device mesh, and each rank holds one shard of every parameter and of its
gradient. Elementwise operations act on the local shards (DTensor dispatches them); the
reductions here (:func:`global_norm`, :func:`dot`, :func:`tensor_dots`) sum the local shards'
contributions and then make **one** all-reduce over the mesh's process group per call, so every
rank gets the norm of the whole (unsharded) vector without gathering any parameter.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

TensorList = Sequence[torch.Tensor]


def sharded_group(tensors: TensorList) -> object | None:
    """The process group the FSDP2 shards in ``tensors`` are spread over, or None when none
    of them is a DTensor.

    Raises:
        ValueError: a DTensor that is not sharded over a 1-D mesh (a replicated or 2-D
            placement, where summing the local parts would not give the norm).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.tensor import DTensor

    group = None
    for t in tensors:
        if isinstance(t, DTensor):
            if t.device_mesh.ndim != 1 or not all(pl.is_shard() for pl in t.placements):
                raise ValueError(
                    "flatlab.optim supports DTensor parameters sharded over a 1-D mesh "
                    f"(FSDP2 fully_shard), got placements {t.placements} on a "
                    f"{t.device_mesh.ndim}-D mesh"
                )
            group = t.device_mesh.get_group()
    return group


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (one all-gather); any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _is_shard(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local")


def _reduced_sums(parts: list[torch.Tensor], sharded: list[bool], group: object,
                  op: str = "sum") -> torch.Tensor:
    """``parts`` (0-d, one per tensor, from local shards) combined over ranks: the sharded
    ones summed (or maxed) over ``group`` in one all-reduce, the others taken once."""
    zero = parts[0].new_zeros(())
    shard = torch.stack([p for p, f in zip(parts, sharded) if f] or [zero])
    rest = torch.stack([p for p, f in zip(parts, sharded) if not f] or [zero])
    if op == "max":
        local = shard.max().reshape(1)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        return torch.maximum(local[0], rest.max())
    local = shard.sum().reshape(1)
    dist.all_reduce(local, group=group)
    return local[0] + rest.sum()


def _precise(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def global_norm(tensors: TensorList, p: float = 2.0) -> torch.Tensor:
    """Return ``(sum_i ||t_i||_p^p)^(1/p)``, the p-norm of all tensors concatenated (0-d tensor).

    Computed in float32 or higher (float64 stays float64). An empty list gives 0. For FSDP2
    shards, the norm of the whole vector, with one all-reduce (module docstring).
    """
    if len(tensors) == 0:
        return torch.zeros(())
    group = sharded_group(tensors)
    if group is not None:
        locals_ = [_local(t) for t in tensors]
        norms = [_precise(n) for n in torch._foreach_norm(locals_, p)]
        flags = [_is_shard(t) for t in tensors]
        if p == float("inf"):
            return _reduced_sums(norms, flags, group, op="max")
        return _reduced_sums([n ** p for n in norms], flags, group) ** (1.0 / p)
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


def dot(a: TensorList, b: TensorList) -> torch.Tensor:
    """``sum_i <a_i, b_i>``, the inner product of the concatenated vectors (0-d tensor, at
    least float32). For FSDP2 shards, over the whole vectors with one all-reduce."""
    if len(a) == 0:
        return torch.zeros(())
    return tensor_dots(a, b).sum()


def tensor_dots(a: TensorList, b: TensorList) -> torch.Tensor:
    """``[<a_i, b_i>]_i``, one inner product per tensor (shape ``(len(a),)``, at least
    float32). For FSDP2 shards, every tensor's whole inner product, with one all-reduce."""
    if len(a) == 0:
        return torch.zeros((0,))
    group = sharded_group(a)
    parts = [_precise(torch.vdot(_local(x).reshape(-1), _local(y).reshape(-1)))
             for x, y in zip(a, b)]
    out = torch.stack(parts)
    if group is not None:
        mask = torch.tensor([_is_shard(t) for t in a], device=out.device)
        shard = torch.where(mask, out, torch.zeros_like(out))
        dist.all_reduce(shard, group=group)
        out = torch.where(mask, shard, out)
    return out


def snapshot(tensors: TensorList) -> list[torch.Tensor]:
    """Return detached copies of ``tensors`` (the saved point that a perturbation is undone to)."""
    return [t.detach().clone() for t in tensors]


def restore_(dst: TensorList, saved: TensorList) -> None:
    """Copy ``saved`` back into ``dst`` in place: undo a perturbation exactly (no subtraction)."""
    with torch.no_grad():  # on the local shards for FSDP2 (no DTensor rule for foreach_copy_)
        torch._foreach_copy_([_local(t) for t in dst], [_local(t) for t in saved])


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
