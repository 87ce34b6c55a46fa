"""The shared shell of every sharpness-aware optimizer: :class:`SharpnessAware`.

A sharpness-aware method computes a *descent gradient* ``d`` from several gradients taken at
perturbed copies of the parameters ``theta`` and then hands ``d`` to an ordinary torch
optimizer (the *base*)::

    theta_{t+1} = base_step(theta_t, d(theta_t))      # e.g. SAM: d = grad L(theta + e(theta))

The shell owns everything that is not the method's own math, so that SAM, ASAM, USAM, GAM,
DGSAM and SAGM get it identically:

* **base optimizer** as a class plus keyword arguments or as an instance; ``opt.param_groups``
  *is* ``opt.base.param_groups`` (and ``opt.state`` *is* ``opt.base.state``), so torch LR
  schedulers attach to the wrapper;
* **closure protocol** (``loss = opt.step(closure)``, as for ``torch.optim.LBFGS``): the closure
  zeroes the grads, runs forward and backward and returns the loss; the shell calls it for the
  first gradient too, so the optimizer works in any generic loop and in PyTorch Lightning's
  automatic optimization. ``step`` returns the loss at the unperturbed point;
* **exact undo**: perturbations are undone by copying a saved point back (``_tree.restore_``),
  never by subtracting, so with zero radii every method equals its base bit for bit;
* **non-finite guard**: a non-finite loss or gradient skips the whole step (parameters and base
  state untouched) and increments ``opt.skipped_steps``; ``on_nonfinite="raise"`` raises; any
  other exception inside a closure (or Ctrl-C) restores the unperturbed parameters first;
* **BatchNorm once per step**: during every pass after the first, the running statistics of
  every ``BatchNorm``/``InstanceNorm`` module that runs (found by wrapping the norm classes'
  ``forward`` for the duration of the pass, so no model is needed) are saved and copied back
  afterwards, including ``num_batches_tracked``; only the unperturbed pass updates them
  (a ``torch.compile``-d model bypasses those forwards: pass ``model=`` and the shell saves
  the model's norm buffers directly);
* **clipping**: ``clip_grad_norm`` (a max norm) and/or ``descent_hook(params)`` act on the
  descent gradient only, right before the base step (clipping the ascent gradient of
  normalized SAM would be a no-op);
* **fp16 + GradScaler**: pass ``grad_scaler=scaler`` and call ``scaler.scale(loss).backward()``
  in the closure; the shell unscales each pass before any norm is taken, re-scales the final
  descent gradient and calls ``scaler.step(opt.base)`` (so one unscale and one inf check per
  step; an overflow skips the step); the user calls ``scaler.update()`` once per step;
* **distributed sync**: ``sync="global"`` perturbs with the gradient averaged over ranks,
  ``sync="local"`` (m-sharpness) perturbs each rank with its own gradient and averages only the
  final descent gradient (one all-reduce). With ``model=`` a ``DistributedDataParallel``
  module, DDP's reducer averages the passes of ``"global"`` and the passes of ``"local"`` run
  under ``model.no_sync()``; with a plain model in an initialized process group the shell does
  the all-reduces itself;
* **state_dict**: the base optimizer's full state (momenta, ...) plus the wrapper's under the
  key ``"flatlab"`` (step counter = schedule position, skipped steps); loading re-links the
  shared param groups, so a resumed run continues bit for bit.

Writing a method (how SAM, GAM, DGSAM, SAGM plug in)
----------------------------------------------------
Subclass :class:`SharpnessAware`, validate your hyperparameters in ``__init__`` and pass them
on as ``super().__init__(params, base, radii={"rho": rho}, **options_and_base_kwargs)``;
``radii`` values may be floats or :mod:`flatlab.optim.schedules` schedules, and the current
value is read as ``self.radius("rho")``. Then implement one method::

    def _descent(self, closure) -> torch.Tensor:
        loss = self._pass(closure, first=True)        # gradient at theta (BN updates here)
        params, grads = self._params_and_grads()
        norm = ...; self._check_finite(loss, norm)  # one host sync; raises NonFiniteStep
        self._save_point(params)                    # the one parameter-sized snapshot
        ... perturb params (functions of flatlab.optim._tree) ...
        self._pass(closure)                         # BN frozen, DDP no_sync when "local"
        self._restore_point(params)                 # params back to theta exactly
        return loss                                 # p.grad now holds the descent gradient

The shell checks the final gradient, syncs it, clips it and steps the base. Raising
:class:`NonFiniteStep` anywhere (``_check_finite`` does) skips the step; the shell restores
the saved point first. Class attributes: ``closure_calls`` (closure calls per step, tested),
``per_domain``. A *per-domain* method (DGSAM, SAGM) sets ``per_domain = True``; its ``step``
then takes a sequence of closures, one per training domain, and ``_descent`` receives that
sequence (the shell checks that it is a non-empty sequence of callables).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from flatlab._checks import check_choice, check_positive
from flatlab.optim import _tree
from flatlab.optim._passes import (
    _allreduce_mean,
    _backward_with_graph,
    frozen_norm_statistics,
    norm_modules,
)
from flatlab.optim.schedules import Schedule, as_schedule

__all__ = ["NonFiniteStep", "SharpnessAware", "frozen_norm_statistics"]

Closure = Callable[[], Any]


class NonFiniteStep(RuntimeError):
    """Raised inside a step when a loss or gradient is not finite (the step is skipped)."""


class SharpnessAware(Optimizer):
    """Shell shared by all sharpness-aware optimizers (see the module docstring).

    Args:
        params: parameters or parameter groups (ignored when ``base`` is an instance, except
            that they must then be the base's parameters, or ``None``).
        base: a ``torch.optim.Optimizer`` subclass (built as ``base(params, **base_kwargs)``)
            or an instance.
        radii: the method's radii by name, each a float >= 0 or a schedule.
        sync: ``"global"`` or ``"local"`` (only matters in a distributed run).
        model: optional, the model the closure runs: a ``DistributedDataParallel`` module
            enables ``no_sync`` for ``sync="local"``; with ``torch.compile`` it is needed so
            that BatchNorm statistics are restored (compiled code skips the Python forwards).
        on_nonfinite: ``"skip"`` (default) or ``"raise"``.
        grad_scaler: an optional ``torch.amp.GradScaler`` (fp16 recipe in the module docstring).
        clip_grad_norm: optional max global 2-norm of the descent gradient.
        descent_hook: optional ``hook(params)`` called on the descent gradient before the step.
        **base_kwargs: keyword arguments of ``base`` when it is a class.

    Attributes:
        base: the base optimizer. skipped_steps: steps skipped for non-finite values.
        steps: calls of ``step`` so far (the schedules' position).
    """

    per_domain: bool = False
    closure_calls: int = 1

    def __init__(
        self,
        params: Any,
        base: type[Optimizer] | Optimizer,
        *,
        radii: dict[str, float | Schedule],
        sync: str = "global",
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        grad_scaler: Any = None,
        clip_grad_norm: float | None = None,
        descent_hook: Callable[[list[torch.Tensor]], None] | None = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(base, Optimizer):
            if isinstance(base, SharpnessAware):
                raise TypeError(f"base must not be a sharpness-aware wrapper, got {base!r}")
            if base_kwargs:
                raise TypeError(
                    f"base_kwargs must be empty when base is an instance, got {sorted(base_kwargs)}"
                )
            if params is not None:
                given = {id(p) for p in _flatten_params(params)}
                owned = {id(p) for g in base.param_groups for p in g["params"]}
                if given != owned:
                    raise ValueError(
                        "params must be None or the base optimizer's parameters when base is an "
                        f"instance, got {len(given)} tensors for a base holding {len(owned)}"
                    )
            self.base = base
        elif isinstance(base, type) and issubclass(base, Optimizer):
            self.base = base(params, **base_kwargs)
        else:
            raise TypeError(
                f"base must be a torch.optim.Optimizer subclass or instance, got {base!r}"
            )
        self._schedules = {name: as_schedule(name, value) for name, value in radii.items()}
        self.sync = check_choice("sync", sync, ("global", "local"))
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
        if grad_scaler is not None and not hasattr(grad_scaler, "get_scale"):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {grad_scaler!r}")
        self.grad_scaler = grad_scaler
        self.clip_grad_norm = (
            None if clip_grad_norm is None else check_positive("clip_grad_norm", clip_grad_norm)
        )
        if descent_hook is not None and not callable(descent_hook):
            raise TypeError(f"descent_hook must be callable, got {descent_hook!r}")
        self.descent_hook = descent_hook
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {model!r}")
        self.model = model
        self._norms = norm_modules(model) if model is not None else []
        self.steps = 0
        self.skipped_steps = 0
        self._radii = {name: s(0, self._lr()) for name, s in self._schedules.items()}
        self._saved: list[torch.Tensor] | None = None
        self._saved_key: tuple = ()
        self._saved_for: list[torch.Tensor] | None = None
        self._scale: float | None = None
        self._dist = False
        # Optimizer.__init__ sets up hooks and step patching; it is given the base's groups
        # and then the group list itself is shared, never copied.
        super().__init__(self.base.param_groups, {})
        self._link()

    # ------------------------------------------------------------------ torch.optim plumbing
    def _link(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "base", None) is not None and self.param_groups is self.base.param_groups:
            self.base.add_param_group(param_group)
        else:  # during Optimizer.__init__, before the groups are shared
            super().add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"flatlab"``: steps and skipped steps."""
        sd = self.base.state_dict()
        sd["flatlab"] = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("flatlab", {})
        self.base.load_state_dict(state_dict)
        self._link()
        self.steps = int(extra.get("steps", 0))
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self._radii = {name: s(self.steps, self._lr()) for name, s in self._schedules.items()}

    def _lr(self) -> float:
        return float(self.base.param_groups[0].get("lr", 0.0))

    def radius(self, name: str) -> float:
        """Current value of radius ``name`` (after the schedule of this step was applied)."""
        return self._radii[name]

    # ------------------------------------------------------------------ the step
    def step(self, closure: Closure | Sequence[Closure] | None = None) -> torch.Tensor | None:
        """One step: calls ``closure`` ``closure_calls`` times and the base once; returns the
        loss at the unperturbed point (a per-domain method takes a sequence of closures)."""
        closure = self._check_closure(closure)
        self._radii = {name: s(self.steps, self._lr()) for name, s in self._schedules.items()}
        self.steps += 1
        self._saved_for = None
        self._dist = self._distributed()
        self._scale = float(self.grad_scaler.get_scale()) if self.grad_scaler else None
        try:
            loss = self._descent(closure)
            params, grads = self._params_and_grads()
            if self.sync == "local" and self._dist:
                _allreduce_mean(grads)  # the one all-reduce of m-sharpness
            # finite iff its 2-norm is (an overflowing norm also counts as non-finite); the
            # inf-norm would be exact but costs 5x more on CPU
            self._check_finite(None, _tree.global_norm(grads))
        except NonFiniteStep:
            if self._saved_for is not None:
                self._restore_point(self._saved_for)
            self.skipped_steps += 1
            if self.grad_scaler is not None:
                self._scaler_skip()
            elif self.on_nonfinite == "raise":
                raise
            return None
        except BaseException:  # an error (or Ctrl-C) inside a closure: never leave theta perturbed
            if self._saved_for is not None:
                self._restore_point(self._saved_for)
            raise
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
        if self.descent_hook is not None:
            self.descent_hook(params)
        if self.grad_scaler is not None:
            torch._foreach_mul_(grads, self._scale)
            self.grad_scaler.step(self.base)
        else:
            self.base.step()
        return loss

    def _descent(self, closure: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _descent(closure)")

    def _check_closure(self, closure: Any) -> Any:
        if self.per_domain:
            if (
                closure is None
                or callable(closure)
                or not isinstance(closure, Sequence)
                or len(closure) == 0
            ):
                raise ValueError(
                    f"{type(self).__name__}.step needs a non-empty sequence of closures, one per "
                    f"domain, got {closure!r}"
                )
            for i, c in enumerate(closure):
                if not callable(c):
                    raise TypeError(f"closures[{i}] must be callable, got {c!r}")
            return list(closure)
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure that zeroes grads, runs forward and "
                "backward and returns the loss, got None"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {closure!r}")
        return closure

    # ------------------------------------------------------------------ helpers for methods
    def _pass(
        self, closure: Closure, *, first: bool = False, create_graph: bool = False
    ) -> torch.Tensor:
        """Run ``closure`` once and return its loss; afterwards ``p.grad`` holds the gradient,
        unscaled (GradScaler) and averaged over ranks when ``sync="global"`` needs it.
        ``first=False`` freezes norm statistics; ``create_graph=True`` keeps the graph of the
        gradient (for Hessian-vector products) by running ``backward`` with create_graph."""
        with contextlib.ExitStack() as stack:
            if not first:
                stack.enter_context(frozen_norm_statistics(self._norms))
            ddp = self._ddp()
            if ddp is not None and self.sync == "local":
                stack.enter_context(ddp.no_sync())
            if create_graph:
                stack.enter_context(_backward_with_graph())
            stack.enter_context(torch.enable_grad())
            loss = closure()
        reduce = self.sync == "global" and self._dist and self._ddp() is None
        if first or self._scale is not None or reduce:
            _, grads = self._params_and_grads()
            if first and any(gr.is_sparse for gr in grads):
                raise ValueError(
                    f"{type(self).__name__} does not support sparse gradients, got a sparse "
                    "gradient"
                )
            if self._scale is not None:
                torch._foreach_mul_(grads, 1.0 / self._scale)
            if reduce:
                _allreduce_mean(grads)
        if loss is not None and not isinstance(loss, torch.Tensor):
            loss = torch.as_tensor(loss)
        return loss

    def _params_and_grads(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        return params, [p.grad for p in params]

    def _check_finite(self, loss: torch.Tensor | None, *values: torch.Tensor) -> list[float]:
        """One host sync: return ``values`` as floats, raising NonFiniteStep unless ``loss``
        and all ``values`` are finite (agreed over ranks in a distributed "local" run)."""
        items = [v.detach().reshape(()) for v in values]
        if loss is not None:
            items.append(loss.detach().reshape(()))
        out: list[float] = []
        if items:
            device = items[0].device
            out = torch.stack([t.to(device, torch.float64) for t in items]).tolist()
        finite = all(math.isfinite(v) for v in out)
        if self._dist and self.sync == "local":
            flag = torch.tensor([float(finite)], device=items[0].device if items else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = bool(flag.item() == 1.0)
        if not finite:
            raise NonFiniteStep(f"non-finite loss or gradient at step {self.steps}")
        return out[: len(values)]

    def _save_point(self, params: list[torch.Tensor]) -> None:
        """Copy ``params`` into the reusable snapshot buffer (one parameter-sized buffer)."""
        key = tuple(map(id, params))
        if self._saved is not None and key == self._saved_key:
            try:
                _tree.restore_(self._saved, params)
            except RuntimeError:  # a parameter changed shape since the last step
                self._saved = None
        if self._saved is None or key != self._saved_key:
            self._saved = _tree.snapshot(params)
            self._saved_key = key
        self._saved_for = params

    def _restore_point(self, params: list[torch.Tensor]) -> None:
        _tree.restore_(params, self._saved)
        self._saved_for = None

    def _ddp(self) -> nn.Module | None:
        m = self.model
        if m is not None and isinstance(m, nn.parallel.DistributedDataParallel):
            return m
        return None

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _scaler_skip(self) -> None:
        """Let the GradScaler see an overflow so ``scaler.update()`` backs off the scale."""
        params, grads = self._params_and_grads()
        if not grads:
            return
        if _tree.all_finite(grads):
            grads[0].fill_(float("nan"))
        self.grad_scaler.step(self.base)


def _flatten_params(params: Any) -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        return [params]
    out: list[torch.Tensor] = []
    for item in list(params):
        if isinstance(item, dict):
            ps = item["params"]
            out.extend([ps] if isinstance(ps, torch.Tensor) else list(ps))
        else:
            out.append(item)
    return out
