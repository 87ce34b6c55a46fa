r"""Data-parallel training in the laboratory: R processes, one global minibatch.

A laboratory run at R ranks (``flatlab run NAME --nproc R``, or ``torchrun ... -m flatlab run
NAME``) trains what the same run trains in one process, split over the ranks:

* **Sampling.** Every rank holds the whole training set and draws the *same* minibatch
  indices from the same seeded generator; rank ``r`` takes its contiguous part
  ``torch.tensor_split(idx, R)[r]`` (sizes ``n_r`` differ by at most one).
* **Gradients.** Rank ``r`` back-propagates ``(R n_r / n) L_r``, so the average over the ranks
  of its gradient is ``sum_r n_r grad L_r / n = grad L``, the gradient of the global
  minibatch's mean loss, whatever the split. flatlab's sharpness-aware optimizers average every
  pass themselves (``sync="global"``: the perturbation uses ``grad L``; see
  docs/distributed.md); for any other optimizer the loop averages each pass's gradients with
  one all-reduce. The logged loss is the global ``sum_r n_r L_r / n``.
* **Buffers** (BatchNorm statistics) are broadcast from rank 0 after every step, as DDP does
  before every forward, so every rank holds the same model.
* **Seeding** is the same on every rank (the same initial network); so are the checkpoints:
  rank 0 writes them and every rank resumes from them.
* **Writing.** Only rank 0 writes the run folder (config, metrics, plots, checkpoints,
  report); the other ranks follow it read-only (:meth:`flatlab.train.Run.follow`).
* **Measurements** (the callbacks' evaluation, curvature, sharpness and sparsity, and the
  experiments' end-of-run measurements) are sharded too: :meth:`DataParallel.shard` gives
  rank ``r`` the contiguous part ``[lo_r, hi_r)`` of every batch of the data, and the
  measurement, called with ``distributed=True``, sums over the ranks. Its value is that of
  the full data, ``sum_{b,r} n_{b,r} L_{b,r} / N = sum_b n_b L_b / N``, the same on every
  rank; each rank runs ``~1/R`` of the forward and backward passes.

So a run at R ranks equals the run in one process up to floating-point summation order
(tested in float64 at 2 gloo ranks), and a run saved at R ranks resumes bit for bit at R ranks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class DataParallel:
    """The ranks of the default process group, as the training loop uses them.

    Attributes:
        rank, world: this process's rank and the number of ranks.
        writes: True on rank 0, the only rank that writes files.
        owned: True when :func:`init_from_env` joined the group (and :meth:`close` leaves it).
    """

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.writes = self.rank == 0
        self.owned = False  # this object's init_from_env joined the group

    def close(self) -> None:
        """Wait for every rank, then leave the group if :func:`init_from_env` joined it."""
        dist.barrier()  # gloo aborts a rank still in a collective when the group goes
        if self.owned:
            dist.destroy_process_group()

    @property
    def device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def part(self, x: Any, y: torch.Tensor) -> tuple[Any, torch.Tensor, float]:
        """This rank's contiguous part of a global minibatch and its gradient weight
        ``R n_r / n``."""
        n = int(y.shape[0])
        if n < self.world:
            raise ValueError(f"a minibatch of {n} examples cannot be split over {self.world} "
                             f"ranks: use batch_size >= {self.world}")
        lo, hi = _bounds(n, self.world, self.rank)
        return x[lo:hi], y[lo:hi], self.world * (hi - lo) / n

    def shard(self, data: Any) -> Any:
        """This rank's part of a measurement's ``data``, or ``None`` when it cannot be split.

        A tensor pair ``(x, y)`` gives its rows ``[lo_r, hi_r)`` (as :meth:`part` cuts); a list
        or tuple of pairs gives that part of every pair. ``None`` (the caller then measures
        the whole data on every rank, as one process does) for anything else, e.g. a
        DataLoader, and for a pair of fewer than ``R`` rows, which would leave a rank
        without data. Every rank holds the same data, so every rank decides alike.
        """
        from flatlab._batches import _is_pair

        pairs = [data] if _is_pair(data) else data
        if not isinstance(pairs, (list, tuple)) or not pairs or not all(
                _is_pair(p) and p[0].dim() > 0 and p[0].shape[0] == p[1].shape[0]
                and p[0].shape[0] >= self.world for p in pairs):
            return None
        parts = []
        for x, y in pairs:
            lo, hi = _bounds(int(y.shape[0]), self.world, self.rank)
            parts.append((x[lo:hi], y[lo:hi]))
        return parts[0] if _is_pair(data) else parts

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """``t <- mean_r t_r`` in place, one all-reduce of a flat buffer."""
        from flatlab.optim._step import allreduce_mean

        allreduce_mean(tensors)

    def mean_loss(self, loss: float, weight: float) -> float:
        """The global minibatch loss ``sum_r n_r L_r / n`` from ``L_r`` and ``R n_r / n``."""
        t = torch.tensor([loss * weight / self.world], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def sync_buffers_(self, model: nn.Module) -> None:
        """Broadcast the model's buffers (BatchNorm statistics) from rank 0."""
        for b in model.buffers():
            dist.broadcast(b.data, src=0)

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def measured(data: Any, parallel: DataParallel | None) -> tuple[Any, bool]:
    """``(data, distributed)`` for a measurement inside a run: this rank's shard and ``True``
    at several ranks (:meth:`DataParallel.shard`), else ``data`` unchanged and ``False``.

    Example: ``part, dist = measured(data, run.parallel)`` then
    ``top_eigenvalues(model, loss_fn, part, 1, distributed=dist)``.
    """
    part = parallel.shard(data) if parallel is not None else None
    return (data, False) if part is None else (part, True)


def _bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s part of ``n`` items, as ``torch.tensor_split`` cuts."""
    size, extra = divmod(n, world)
    lo = rank * size + min(rank, extra)
    return lo, lo + size + (1 if rank < extra else 0)


def current() -> DataParallel | None:
    """The data-parallel group of this process: the initialized default group of more than
    one rank, else ``None``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel()
    return None


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or ``flatlab run --nproc``) started at > 1 ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env() -> DataParallel | None:
    """The data-parallel group of this process: the default group if one is initialized,
    else the one torchrun describes in the environment, joined now (gloo on CPU, NCCL with
    CUDA; :meth:`DataParallel.close` leaves it again), else ``None``."""
    owned = False
    if launched_by_torchrun() and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        owned = True
    par = current()
    if par is not None:
        par.owned = owned
    elif owned:  # a group of one rank: nothing to share
        dist.destroy_process_group()
    return par


def reduces_itself(optimizer: Any) -> bool:
    """True for flatlab's sharpness-aware optimizers, which average every pass's gradient over
    the ranks themselves (so the loop must not)."""
    from flatlab.optim.base import SharpnessAware

    return isinstance(optimizer, SharpnessAware)
