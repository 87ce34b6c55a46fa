"""Graph passes on FSDP2-sharded models: the full parameters a double backward needs.

A Hessian-vector product is a double backward: ``H v = d<grad L(theta), v>/d theta``, which
needs the first gradient as a function of the parameters (``create_graph=True``). Under FSDP2
(``torch.distributed.fsdp.fully_shard``) the parameters the optimizer holds are DTensor shards
that never enter the autograd graph: FSDP2's hooks all-gather them into unsharded tensors
before a module's forward and backward, take the gradient with respect to those, reduce-scatter
it into the shards and free the unsharded storage again (the reshard). A double backward then
finds the storage it saved freed (``setStorage: ... out of bounds for storage of size 0``).

:class:`GatheredParameters` holds the unsharded parameters for one graph pass and its products:

* every FSDP module of the model is made to keep its parameters unsharded after backward
  (``set_reshard_after_backward(False)``, the user's setting put back afterwards), and
  :meth:`unshard` all-gathers them again before the backward (which restores a storage freed
  by the reshard after forward, in place, so the graph's saved tensors are valid; the
  products then find them still unsharded);
* :meth:`unshard` returns the unsharded parameters, aligned with the optimizer's shards and
  found by name in ``model.named_parameters()`` (FSDP2 swaps the module attributes while
  unsharded), so the gradient and the products are taken with respect to them: full-size
  tensors, this rank's batch only;
* :meth:`release` reshards (the next forward all-gathers the shards as they are then, e.g.
  perturbed).

What a method derives from them is averaged over the ranks (one all-reduce of the full
tensors, as DDP does: the mean over ranks of ``H_r v`` is ``H v``) and cut to this rank's
shard by :func:`to_shards`. So a step with graph passes holds, on every rank, the full
parameters and full-size gradients while its graph is alive: DDP's memory for those passes,
not FSDP's. The other passes and the base optimizer's step stay sharded.

Only FSDP2's public module API is called, except one read: the current
``reshard_after_backward`` of each parameter group, so that it can be put back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["GatheredParameters", "to_shards"]


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _reshards_after_backward(module: nn.Module) -> bool:
    """The module's ``reshard_after_backward`` (True, FSDP2's default, where it is unreadable)."""
    try:
        groups = module._get_fsdp_state()._fsdp_param_groups
    except AttributeError:
        return True
    return all(g.reshard_after_backward for g in groups)


class GatheredParameters:
    """The unsharded parameters of the FSDP2 module ``model`` for the graph passes of one step.

    Args:
        model: the ``fully_shard``-ed module the closure runs (the optimizer's ``model=``).
        params: the optimizer's parameters (DTensor shards, or plain tensors of modules FSDP
            does not manage), each registered in ``model``.

    Raises:
        ValueError: a parameter that ``model`` does not hold, or a model with no FSDP module.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]) -> None:
        self.model = model
        self.modules = _fsdp_modules(model)
        if not self.modules:
            raise ValueError(
                f"model= is not an FSDP2 module (no fully_shard-ed module in "
                f"{type(model).__name__}), but the parameters are FSDP2 shards"
            )
        names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        missing = sum(id(p) not in names for p in params)
        if missing:
            raise ValueError(
                f"{missing} of the optimizer's parameters are not parameters of model= "
                f"({type(model).__name__}); pass the fully_shard-ed module that holds them all"
            )
        self.names = [names[id(p)] for p in params]
        self._settings = [_reshards_after_backward(m) for m in self.modules]
        for m in self.modules:
            m.set_reshard_after_backward(False, recurse=False)
        self.active = True

    def unshard(self) -> list[torch.Tensor]:
        """All-gather every module's parameters (again) and return the unsharded ones, aligned
        with ``params``."""
        for m in self.modules:
            m.unshard()
        found = dict(self.model.named_parameters(remove_duplicate=False))
        return [found[name] for name in self.names]

    def release(self) -> None:
        """Reshard every module and put back its ``reshard_after_backward``."""
        if not self.active:
            return
        self.active = False
        for m, setting in zip(self.modules, self._settings):
            m.reshard()
            m.set_reshard_after_backward(setting, recurse=False)


def to_shards(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each full tensor cut to this rank's part, laid out as its parameter in ``like`` (a
    DTensor shard: the same mesh and placements; a plain tensor: the tensor itself) and in
    its dtype (under a mixed-precision policy the unsharded parameters, and so the graph's
    gradients, may be in a lower one). No communication: every rank holds the same full
    tensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = []
    for t, p in zip(tensors, like):
        t = t.to(p.dtype)
        if isinstance(p, DTensor):
            t = distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None)
        out.append(t)
    return out
