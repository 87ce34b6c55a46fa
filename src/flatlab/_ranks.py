"""Data-parallel measurements: sums over the ranks of a process group.

A measurement taken with ``distributed=True`` (the default process group) or
``distributed=<group>`` runs on every rank of the group, and each rank passes its own shard
of the data. Every quantity flatlab measures is a size-weighted mean over the data,

    A v = (sum_r sum_{b in shard r} n_b A_b v) / (sum_r sum_{b in shard r} n_b),

(a Hessian- or GGN-vector product, a loss, a gradient, an activation count), so
:meth:`Ranks.mean` sums the numerator and the denominator over the ranks in **one**
all-reduce and divides: the result is the full-data quantity whatever the shard sizes, the
same as one process holding all the data, up to the order of the floating-point sum.

An all-reduce hands every rank the same bits, so the solvers (Lanczos, the trace
estimators, SLQ, the sharpness ascents), run redundantly on every rank, take the same
decisions and return identical results. Two things could still make the ranks diverge, and
both are checked: different parameters on the ranks (a model not broadcast) and different
start or probe vectors (a user's own ``init``); :meth:`Ranks.check_same` compares a
fingerprint of a tensor over the ranks and names the rank that differs. The seeded probes
(``seed=``) are drawn from a CPU generator, identical on every rank by construction.
A wall-clock budget (``max_seconds``) is a per-process clock; :meth:`Ranks.agree_min` makes
the budget's verdict the same on every rank.

Shapes: :meth:`Ranks.mean` takes any tensor and returns one of the same shape.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class Ranks:
    """The ranks of ``group`` (``None``: the default process group) a measurement spans."""

    def __init__(self, group: Any = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``sum_r values_r`` on every rank (a new tensor)."""
        out = values.clone()
        dist.all_reduce(out, group=self.group)
        return out

    def mean(self, total: torch.Tensor, count: float) -> torch.Tensor:
        """``sum_r total_r / sum_r count_r``: one all-reduce of ``total`` with ``count``."""
        buf = torch.cat([total.reshape(-1), total.new_tensor([float(count)])])
        dist.all_reduce(buf, group=self.group)
        return (buf[:-1] / buf[-1]).reshape(total.shape)

    def agree_min(self, n: int) -> int:
        """``min_r n_r``: a decision every rank takes the same way."""
        t = torch.tensor([int(n)], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def check_same(self, what: str, tensor: torch.Tensor, fix: str) -> None:
        """Raise ``ValueError`` naming the first rank whose ``tensor`` differs from rank 0's.

        The fingerprint is ``(numel, sum x, sum x_i (1 + i / numel))`` in float64, gathered
        from every rank; equal tensors give bit-equal fingerprints.
        """
        x = tensor.detach().reshape(-1).double()
        ramp = torch.linspace(1.0, 2.0, x.numel(), dtype=torch.float64, device=x.device)
        mine = torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * ramp).sum()])
        mine = mine.to(self.device)
        seen = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(seen, mine, group=self.group)
        for r, other in enumerate(seen):
            if not torch.equal(other, seen[0]):
                raise ValueError(
                    f"{what} must be the same on every rank, got a different one on rank {r} "
                    f"than on rank 0 (fingerprint {other.tolist()} vs {seen[0].tolist()}): "
                    f"{fix}")

    @property
    def device(self) -> torch.device:
        """Where the group's collectives take tensors: the current CUDA device under NCCL."""
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def ranks_of(distributed: Any) -> Ranks | None:
    """``distributed`` as :class:`Ranks`: ``False``/``None`` -> ``None`` (one process),
    ``True`` -> the default group, a ``ProcessGroup`` -> that group.

    Raises:
        ValueError: ``True`` or a group without an initialized ``torch.distributed``.
        TypeError: anything else.
    """
    if distributed is None or distributed is False:
        return None
    if isinstance(distributed, Ranks):
        return distributed
    if distributed is not True and not (
            dist.is_available() and isinstance(distributed, dist.ProcessGroup)):
        raise TypeError("distributed must be True, False or a torch.distributed ProcessGroup, "
                        f"got {type(distributed).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            f"distributed={distributed!r} needs an initialized process group: call "
            "torch.distributed.init_process_group first (or launch with torchrun)")
    return Ranks(None if distributed is True else distributed)


def weighted_mean(total: torch.Tensor, count: float, ranks: Ranks | None) -> torch.Tensor:
    """``total / count`` in one process, summed over the ranks first otherwise."""
    if ranks is None:
        return total / count
    return ranks.mean(total, count)
