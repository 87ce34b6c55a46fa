r"""Callbacks of :func:`flatlab.train.fit`: measurements merged into the step's metric record.

A callback runs after the optimizer step whenever ``step % every == 0`` (and at step 0 and the
last step) and returns a dict of metrics. Callbacks that keep state between calls (the
curvature monitor warm-starts Lanczos from its last eigenvector) expose ``state_dict`` /
``load_state_dict`` so a resumed run measures exactly what the uninterrupted one did.

* :class:`Evaluate` - mean loss and accuracy on named datasets (``val_loss``, ``val_acc``...).
* :class:`CurvatureMonitor` - top Hessian eigenvalue ``λ_max`` (Lanczos,
  :func:`flatlab.curvature.top_eigenvalues`) next to the edge of stability of the optimizer:
  ``2/η`` for GD and, for SAM-type runs, the USAM edge ``4 / (η (1 + sqrt(1 + 8ρ/η)))`` or the
  SAM edge with ``ρ/‖∇L‖`` in place of ρ (:func:`flatlab.optim.stability.edge_of_stability`;
  Cohen et al. arXiv 2103.00065, Agarwala & Dauphin arXiv 2302.08692). These edges hold for
  plain steps (no momentum).
* :class:`Sharpness` - a sharpness measure of :mod:`flatlab.curvature` (worst-case,
  average, first-order flatness, Hessian trace).
* :class:`ActivationSparsity` - :func:`flatlab.sparsity.activation_sparsity` (mean and per
  layer zero-derivative fractions).
* :class:`Checkpoint` - ask ``fit`` to save ``latest.pt`` every ``every`` steps.

:mod:`flatlab.curvature` and :mod:`flatlab.sparsity` are imported on first use, so the loop
itself needs neither.

In a data-parallel run (``FitState.parallel`` set) every measurement takes this rank's shard
of its data and sums over the ranks (:func:`flatlab.train.parallel.measured`): the logged
value is the full data's, the same on every rank, at ~1/R of the passes per rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flatlab import curvature
from flatlab._batches import batches
from flatlab._checks import check_choice, check_nonnegative, check_positive_int

__all__ = [
    "ActivationSparsity", "Callback", "Checkpoint", "CurvatureMonitor", "Evaluate", "FitState",
    "Sharpness",
]


@dataclass
class FitState:
    """What a callback sees: the model, optimizer, loss, training data and the current step."""

    model: nn.Module
    optimizer: Any
    loss_fn: Any
    train: list[tuple[torch.Tensor, torch.Tensor]]
    steps: int
    run: Any = None
    tag: str = "train"
    step: int = 0
    loss: float = float("nan")
    diverged: bool = False
    parallel: Any = None  # the run's DataParallel group at several ranks

    def measured(self, data: Any) -> tuple[Any, bool]:
        """``(data, distributed)`` for a measurement on ``data`` (default: the training set):
        this rank's shard and ``True`` in a data-parallel run, else the data and ``False``."""
        from flatlab.train.parallel import measured

        return measured(self.train_data() if data is None else data, self.parallel)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_data(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole training set as a list of batches (one per domain)."""
        return list(self.train)


class Callback:
    """Base class: override :meth:`on_step`; ``every`` sets how often it runs."""

    def __init__(self, every: int = 1) -> None:
        self.every = check_positive_int("every", every)

    def on_step(self, state: FitState) -> Mapping[str, Any] | None:
        """Measure at ``state.step``; return metrics to merge into the step's record."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        pass


class Checkpoint(Callback):
    """Save a checkpoint every ``every`` steps (``fit`` always saves one at the end)."""

    def on_step(self, state: FitState) -> None:
        return None


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Any, data: Any,
             distributed: Any = False) -> dict[str, float]:
    """Mean loss (weighted by batch size) and, for class-index targets, accuracy over ``data``.

    ``distributed``: ``True`` or a process group: every rank passes its own shard of the data
    and the sums are reduced over the ranks (one all-reduce), so every rank gets the full
    data's loss and accuracy.
    """
    from flatlab._ranks import ranks_of

    ranks = ranks_of(distributed)
    was = model.training
    model.eval()
    total, loss_sum, correct, classify = 0, 0.0, 0, True
    try:
        for x, y, n in batches(data):
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * n
            total += n
            if classify and out.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
                correct += int((out.argmax(dim=1) == y).sum())
            else:
                classify = False
    finally:
        model.train(was)
    if ranks is not None:
        sums = ranks.sum(torch.tensor([loss_sum, total, correct, float(classify)],
                                      dtype=torch.float64, device=ranks.device)).tolist()
        loss_sum, total, correct = sums[0], sums[1], sums[2]
        classify = sums[3] == ranks.world
    result = {"loss": loss_sum / total}
    if classify:
        result["acc"] = correct / total
    return result


class Evaluate(Callback):
    """Loss and accuracy on named datasets: logs ``<name>_loss`` and ``<name>_acc``.

    Args:
        data: ``{"val": (x, y), "test": ...}``; a single pair is named ``"val"``.
        every: run every this many steps.
        loss_fn: defaults to the training loss.
    """

    def __init__(self, data: Any, every: int = 1, loss_fn: Any = None) -> None:
        super().__init__(every)
        if isinstance(data, Mapping):
            self.data = dict(data)
        else:
            self.data = {"val": data}
        if not self.data:
            raise ValueError("data must name at least one dataset, got an empty mapping")
        self.loss_fn = loss_fn

    def on_step(self, state: FitState) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, data in self.data.items():
            part, across = state.measured(data)
            for key, value in evaluate(state.model, self.loss_fn or state.loss_fn, part,
                                       distributed=across).items():
                out[f"{name}_{key}"] = value
        return out


class CurvatureMonitor(Callback):
    """Top Hessian eigenvalue(s) of the training loss every ``every`` steps, with the edges.

    Logs ``lambda_max`` (and ``lambda_2``... for ``k > 1``), ``edge_gd = 2/lr`` and, when
    ``rho > 0``, ``edge_usam`` (``method="usam"``) or ``edge_sam`` and ``grad_norm``
    (``method="sam"``).

    By default the edge and the radius come from the optimizer being trained: flatlab's
    ``SAM`` gives ``method="sam"`` (``normalize=False``: ``"usam"``; ``adaptive=True`` and every
    other optimizer: ``"gd"``), and ``rho`` is the radius its next step uses
    (``opt.radius("rho", upcoming=True)``, so a rho schedule is followed).

    Args:
        data: where the Hessian is measured (default: the whole training set).
        every: run every this many steps.
        k: number of top eigenvalues.
        method: ``"auto"`` (default, from the optimizer), ``"gd"``, ``"usam"`` or ``"sam"``:
            which edge to add besides 2/lr.
        rho: None (default: the optimizer's radius), or the SAM radius for the USAM / SAM
            edge: a float, or a :class:`flatlab.optim.schedules.Schedule` evaluated as
            ``rho(step, lr)``, the radius the optimizer's next step uses.
        warm_start: start Lanczos from the previous top eigenvector.
        **kwargs: passed to :func:`flatlab.curvature.top_eigenvalues`.
    """

    def __init__(
        self, data: Any = None, every: int = 10, k: int = 1, method: str = "auto",
        rho: Any = None, warm_start: bool = True, **kwargs: Any,
    ) -> None:
        super().__init__(every)
        self.data = data
        self.k = check_positive_int("k", k)
        self.method = check_choice("method", method, ("auto", "gd", "usam", "sam"))
        self.rho = rho if rho is None or callable(rho) else check_nonnegative("rho", rho)
        self.warm_start = warm_start
        self.kwargs = kwargs
        self.init: torch.Tensor | None = None

    def on_step(self, state: FitState) -> dict[str, float]:
        from flatlab.optim.stability import edge_of_stability

        data, across = state.measured(self.data)
        init = self.init if self.warm_start else None
        res = curvature.top_eigenvalues(state.model, state.loss_fn, data, self.k, init=init,
                                        distributed=across, **self.kwargs)
        values = [float(v) for v in torch.as_tensor(res.values).flatten()]
        if self.warm_start and getattr(res, "vectors", None) is not None:
            vec = torch.as_tensor(res.vectors)
            self.init = (vec[:, 0] if vec.dim() == 2 else vec).detach().clone()
        out = {"lambda_max": values[0]}
        for i, v in enumerate(values[1:], start=2):
            out[f"lambda_{i}"] = v
        lr = state.lr
        method, rho = self._edge(state)
        out["edge_gd"] = edge_of_stability("gd", lr)
        if rho > 0 and method == "usam":
            out["edge_usam"] = edge_of_stability("usam", lr, rho)
        elif rho > 0 and method == "sam":
            g = curvature.gradient_norm(state.model, state.loss_fn, data,
                                        distributed=across).value
            out["grad_norm"] = g
            out["edge_sam"] = edge_of_stability("sam", lr, rho, grad_norm=g)
        return out

    def _edge(self, state: FitState) -> tuple[str, float]:
        """(method, rho) for this measurement: given, or read from the optimizer."""
        from flatlab.optim import SAM

        opt = state.optimizer
        method = self.method
        if method == "auto":
            method = "gd"
            if isinstance(opt, SAM) and not opt.adaptive:
                method = "sam" if opt.normalize else "usam"
        if method == "gd":
            return method, 0.0
        if self.rho is None:
            radius = getattr(opt, "radius", None)
            return method, float(radius("rho", upcoming=True)) if radius else 0.0
        if callable(self.rho):
            return method, float(self.rho(state.step, state.lr))
        return method, float(self.rho)

    def state_dict(self) -> dict[str, Any]:
        return {"init": self.init}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.init = state.get("init")


_SHARPNESS = {
    "worst_case": ("worst_case_sharpness", True),
    "average": ("average_sharpness", True),
    "first_order": ("first_order_flatness", True),
    "trace": ("hessian_trace", False),
}


class Sharpness(Callback):
    """A sharpness measure of the training loss: logs ``sharpness_<measure>``.

    Args:
        data: where it is measured (default: the whole training set).
        every: run every this many steps.
        measure: ``"worst_case"`` (max over the rho-ball of the loss increase, SAM's),
            ``"average"`` (mean increase under Gaussian noise of scale rho),
            ``"first_order"`` (GAM's rho * max ||grad|| on the ball) or ``"trace"``
            (the Hessian trace by :func:`~flatlab.curvature.hessian_trace`'s default route).
        rho: radius of the neighbourhood (not used by ``"trace"``).
        **kwargs: passed to the :mod:`flatlab.curvature` function.
    """

    def __init__(
        self, data: Any = None, every: int = 10, measure: str = "worst_case", rho: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(every)
        self.data = data
        self.measure = check_choice("measure", measure, tuple(_SHARPNESS))
        self.rho = check_nonnegative("rho", rho)
        self.kwargs = kwargs

    def on_step(self, state: FitState) -> dict[str, float]:
        name, takes_rho = _SHARPNESS[self.measure]
        fn = getattr(curvature, name)
        kwargs = dict(self.kwargs)
        if takes_rho:
            kwargs.setdefault("rho", self.rho)
        data, across = state.measured(self.data)
        res = fn(state.model, state.loss_fn, data, distributed=across, **kwargs)
        return {f"sharpness_{self.measure}": float(res.value)}


class ActivationSparsity(Callback):
    """Zero-derivative fraction of the activations: ``act_sparsity`` and ``act_sparsity/<layer>``.

    Args:
        data: inputs to probe with (default: the whole training set).
        every: run every this many steps.
        per_layer: also log each layer's fraction.
    """

    def __init__(self, data: Any = None, every: int = 10, per_layer: bool = True) -> None:
        super().__init__(every)
        self.data = data
        self.per_layer = per_layer

    def on_step(self, state: FitState) -> dict[str, float]:
        from flatlab.sparsity import activation_sparsity

        data, across = state.measured(self.data)
        res = activation_sparsity(state.model, data, distributed=across)
        out = {"act_sparsity": float(res.mean)}
        if self.per_layer:
            for layer, frac in res.per_layer.items():
                out[f"act_sparsity/{layer}"] = float(frac)
        return out
