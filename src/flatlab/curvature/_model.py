"""Model plumbing shared by every curvature measurement.

A measurement never mutates the model. It

* selects the parameters it differentiates with respect to (:func:`resolve_params`): all
  trainable ones, one submodule, or a list of tensors / names;
* evaluates the loss *functionally* with :func:`torch.func.functional_call` on detached
  copies, so ``requires_grad`` flags, ``.grad`` fields, parameters and buffers stay as they
  were (buffers are cloned, so train-mode BatchNorm cannot update its running statistics);
* switches the model to eval mode for the measurement and restores every submodule's own
  ``training`` flag afterwards (:func:`measurement_mode`).

Flat vectors: the selected tensors ``w_1, ..., w_P`` (shapes ``s_1, ..., s_P``) are
concatenated in order into one vector of length ``n = sum_i prod(s_i)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def measured_model(model: Any) -> nn.Module:
    """The module a measurement differentiates: a DDP wrapper's ``.module``, else ``model``.

    DDP keeps a full replica on every rank, so its inner module is measured (with
    ``distributed=`` for the data-parallel sum). FSDP2 parameters are DTensor shards tied to
    the forward pass by FSDP's own all-gather hooks, which :func:`torch.func.functional_call`
    bypasses, so a sharded model is refused.

    Raises:
        TypeError: a non-module, or a model with DTensor (FSDP2) parameters.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4, or a build without torch.distributed
        DTensor = ()  # noqa: N806
    sharded = next((n for n, p in model.named_parameters() if isinstance(p, DTensor)), None)
    if sharded is not None:
        raise TypeError(
            f"model has sharded (FSDP2 / DTensor) parameters ({sharded!r}): curvature "
            "measurements need full parameters on every rank. Measure an unsharded replica "
            "(load torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True)) into a plain copy) and pass "
            "distributed=True to sum over the ranks' data")
    return model


def resolve_params(
    model: nn.Module, params: nn.Module | Iterable[torch.Tensor | str] | None = None
) -> tuple[list[str], list[torch.Tensor]]:
    """Return the names and tensors of the parameters a measurement is taken over.

    Args:
        model: the network.
        params: ``None`` (every parameter with ``requires_grad``), a submodule of ``model``,
            or an iterable of parameter tensors of ``model`` or of their names.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if a tensor or name is not a parameter of ``model``, or none is selected.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    by_id = {id(p): name for name, p in named.items()}
    if params is None:
        names = [name for name, p in named.items() if p.requires_grad]
    else:
        items = list(params.parameters()) if isinstance(params, nn.Module) else list(params)
        names = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(
                        f"params[{i}] must name a parameter of the model, got {item!r}")
                names.append(item)
            elif isinstance(item, torch.Tensor):
                if id(item) not in by_id:
                    raise ValueError(
                        f"params[{i}] must be a parameter of the model, got a tensor of shape "
                        f"{tuple(item.shape)} that does not belong to it"
                    )
                names.append(by_id[id(item)])
            else:
                raise TypeError(
                    f"params[{i}] must be a tensor or a name, got {type(item).__name__}")
        names = list(dict.fromkeys(names))  # drop duplicates, keep order
    if not names:
        raise ValueError("params must select at least one parameter, got none")
    return names, [named[n] for n in names]


@contextlib.contextmanager
def measurement_mode(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Put ``model`` in eval mode (if asked) and restore each submodule's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class FunctionalLoss:
    """``loss(w) = loss_fn(model(inputs; w), targets)`` as a function of the selected tensors.

    Parameters outside the selection and buffers enter as constants (detached clones).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, names: Sequence[str]):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model, self.loss_fn, self.names = model, loss_fn, list(names)
        selected = set(self.names)
        self.fixed = {
            n: p.detach() for n, p in model.named_parameters() if n not in selected
        }

    def outputs(self, tensors: Sequence[torch.Tensor], inputs: Any) -> Any:
        """Model outputs at the selected tensors ``tensors`` (same order as ``names``)."""
        state = dict(self.fixed)
        state.update({n: b.detach().clone() for n, b in self.model.named_buffers()})
        state.update(zip(self.names, tensors))
        return functional_call(self.model, state, (inputs,))

    def loss_of_outputs(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        """Apply ``loss_fn`` and check that it returned a scalar."""
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss_fn must return a scalar (0-d, mean-reduced) tensor, got {shape}"
            )
        return loss

    def __call__(self, tensors: Sequence[torch.Tensor], inputs: Any, targets: torch.Tensor):
        return self.loss_of_outputs(self.outputs(tensors, inputs), targets)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate tensors into one flat vector (length ``sum numel``)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a flat vector into views shaped like ``like`` (inverse of :func:`flatten`)."""
    out, start = [], 0
    for t in like:
        out.append(vector[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def model_device_dtype(tensors: Sequence[torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the selected parameters (the first one's)."""
    return tensors[0].device, tensors[0].dtype


def mean_loss_and_grad(
    floss: FunctionalLoss,
    tensors: Sequence[torch.Tensor],
    data: Any,
    *,
    grad: bool = True,
    ranks: Any = None,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Full-data mean loss ``L = sum_b n_b L_b / N`` and its gradient at ``tensors``.

    One forward (and backward) pass per batch; no graph outlives a batch. Returns the loss as
    a detached 0-d tensor and the gradient as a list aligned with ``tensors`` (or ``None``).
    With ``ranks`` (:class:`flatlab._ranks.Ranks`), the sums and ``N`` run over every rank's
    shard of the data, in one all-reduce.
    """
    from flatlab._batches import batches

    device = tensors[0].device
    total, count = None, 0
    grads: list[torch.Tensor] | None = None
    for inputs, targets, n in batches(data, device=device):
        if grad:
            leaves = [t.detach().requires_grad_() for t in tensors]
            with torch.enable_grad():
                loss = floss(leaves, inputs, targets)
                g = torch.autograd.grad(loss, leaves, allow_unused=True)
            g = [torch.zeros_like(t) if gi is None else gi for gi, t in zip(g, tensors)]
            if grads is None:
                grads = [gi * n for gi in g]
            else:
                torch._foreach_add_(grads, g, alpha=n)
        else:
            with torch.no_grad():
                loss = floss([t.detach() for t in tensors], inputs, targets)
        loss = loss.detach() * n
        total = loss if total is None else total + loss
        count += n
    if ranks is not None:
        parts = [total.reshape(1)] + ([] if grads is None else list(grads))
        mean = ranks.mean(flatten(parts), count)
        return mean[0], None if grads is None else unflatten(mean[1:], tensors)
    if grads is not None:
        torch._foreach_div_(grads, count)
    return total / count, grads
