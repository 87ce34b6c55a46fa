"""The shared shell of every sharpness-aware optimizer: :class:`SharpnessAware`.

A sharpness-aware method computes a *descent gradient* ``d`` from several gradients taken at
perturbed copies of the parameters ``theta`` and then hands ``d`` to an ordinary torch
optimizer (the *base*)::

    theta_{t+1} = base_step(theta_t, d(theta_t))      # e.g. SAM: d = grad L(theta + e(theta))

The shell owns everything that is not the method's own math, so that every method gets it
identically:

* **base optimizer** as a class plus keyword arguments or as an instance; ``opt.param_groups``
  *is* ``opt.base.param_groups`` (and ``opt.state`` *is* ``opt.base.state``), so torch LR
  schedulers attach to the wrapper. Every numeric hyperparameter of every group must be finite.
* **per-group radii**: every radius (``rho``, GAM's ``fd_rho``, ...) can be set per parameter
  group (``{"params": no_decay, "rho": 0.0}``); a group with radius 0 is never perturbed. Norms
  are global over all parameters with a gradient, as in davda54/sam.
* **closure protocol** (``loss = opt.step(closure)``, as for ``torch.optim.LBFGS``): the closure
  runs forward and backward and returns the loss; ``step`` returns the detached loss at the
  unperturbed point. The shell clears the gradients before every pass, so a closure that never
  zeroes them still gives each pass its own gradient; gradients already in ``p.grad`` when
  ``step`` is called (accumulated micro-batches) enter every pass as a fixed term
  (:mod:`flatlab.optim._step`). Protocol mistakes (no backward, ``no_grad``, an unreduced loss,
  ``None``) raise :class:`ClosureError` and do not advance the step counter.
* **exact undo**: perturbations are undone by copying a saved point back (one reusable
  parameter-sized buffer), never by subtracting, so with zero radii every method equals its
  base bit for bit;
* **non-finite guard**: a non-finite loss or gradient skips the whole step (parameters and base
  state untouched) and increments ``opt.skipped_steps``; after ``warn_after_skips`` skips in a
  row a warning names the count (once); ``on_nonfinite="raise"`` raises; any other exception
  inside a closure (or Ctrl-C) restores the unperturbed parameters first;
* **BatchNorm once per step**: only the unperturbed pass updates running statistics. The norm
  modules come from ``model=`` or are discovered in the first pass of the first step
  (:mod:`flatlab.optim._norms`); nothing in torch is patched;
* **clipping**: ``clip_grad_norm`` and/or ``descent_hook(params)`` act on the descent gradient
  only, right before the base step;
* **fp16 + GradScaler**: pass ``grad_scaler=scaler`` and call ``scaler.scale(loss).backward()``
  in the closure; each pass is unscaled before any norm is taken, the final descent gradient is
  re-scaled and handed to ``scaler.step(opt.base)``; the user calls ``scaler.update()``;
* **distributed sync**: ``sync="global"`` perturbs with the gradient averaged over ranks,
  ``sync="local"`` (m-sharpness) perturbs each rank with its own gradient and averages only the
  final descent gradient. With ``model=`` a DDP module, DDP's reducer averages the passes of
  ``"global"`` and the passes of ``"local"`` run under ``model.no_sync()``; with a plain model
  in an initialized process group the shell does the all-reduces itself;
* **state_dict**: the base optimizer's state plus the wrapper's under ``"flatlab"`` (step
  counter = schedule position, skipped steps).

Writing a method
----------------
Subclass :class:`SharpnessAware`, validate the hyperparameters in ``__init__`` and pass the
radii on as ``super().__init__(params, base, radii={"rho": rho}, **kwargs)``. Put the math in
pure functions on lists of tensors (built on :mod:`flatlab.optim._tree`) and implement::

    def _descent(self, ctx, closure) -> torch.Tensor:
        loss = ctx.gradient(closure, first=True)     # g at theta (norm statistics update here)
        direction, norm = my_direction(ctx.params, ctx.grads())
        (n,) = ctx.finite(loss, norm)                # one host sync; raises NonFiniteStep
        ctx.perturb_(direction, "rho", 1 / (n + eps))  # per-group radius; saves theta once
        ctx.gradient(closure)                        # norm statistics frozen
        ctx.restore()                                # theta back exactly
        return loss                                  # p.grad now holds the descent gradient

``ctx`` (:class:`flatlab.optim._step.StepContext`) holds the step's facts; the shell checks the
final gradient, syncs it, clips it and steps the base. State a method keeps across steps (an
EMA, a stored component) is staged with ``ctx.stage_state(key, values)`` and written into
``opt.state[p][key]`` by the shell after a taken step only; a term applied after the base step
goes into ``_after_step(ctx)``, called only for a taken step. A *per-domain* method sets
``per_domain = True``; ``step`` then takes a sequence of closures (checked once, in
:mod:`flatlab.optim._domains`). ``closure_calls`` is a read-only property.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from flatlab._checks import check_choice, check_nonnegative, check_positive, check_positive_int
from flatlab.optim import _tree
from flatlab.optim._norms import NormStatistics, frozen_norm_statistics, norm_modules
from flatlab.optim._step import ClosureError, NonFiniteStep, StepContext, allreduce_mean
from flatlab.optim.schedules import Schedule, as_schedule

__all__ = [
    "ClosureError", "NonFiniteStep", "SharpnessAware", "TwoPass", "frozen_norm_statistics",
]

Closure = Callable[[], Any]


def check_hyperparameters(group: dict[str, Any], where: str) -> None:
    """Raise ValueError naming the key unless every numeric value of ``group`` is finite."""
    for key, value in group.items():
        if key == "params":
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor) and item.numel() == 1:
                item = float(item)
            if isinstance(item, Real) and not isinstance(item, bool) and not math.isfinite(item):
                raise ValueError(f"{where} {key} must be finite, got {value!r}")


class SharpnessAware(Optimizer):
    """Shell shared by all sharpness-aware optimizers (see the module docstring).

    Args:
        params: parameters or parameter groups (ignored when ``base`` is an instance, except
            that they must then be the base's parameters, or ``None``). A group may set any
            of the method's radii by name.
        base: a ``torch.optim.Optimizer`` subclass (built as ``base(params, **base_kwargs)``)
            or an instance.
        radii: the method's radii by name, each a finite float >= 0 or a schedule (the default
            of every group that does not set its own).
        sync: ``"global"`` or ``"local"`` (only matters in a distributed run).
        model: optional, the model the closure runs: its norm modules are used instead of
            discovering them, a ``DistributedDataParallel`` module enables ``no_sync`` for
            ``sync="local"``, and an FSDP2 (``fully_shard``) module lets exact
            Hessian-vector products gather its parameters (required for them there).
        on_nonfinite: ``"skip"`` (default) or ``"raise"``.
        warn_after_skips: warn (once) after this many non-finite skips in a row (default 3).
        grad_scaler: an optional ``torch.amp.GradScaler`` (fp16 recipe in the module docstring).
        clip_grad_norm: optional max global 2-norm of the descent gradient.
        descent_hook: optional ``hook(params)`` called on the descent gradient before the step.
        **base_kwargs: keyword arguments of ``base`` when it is a class.

    Attributes:
        base: the base optimizer. skipped_steps: steps skipped for non-finite values.
        steps: steps taken or skipped so far (the schedules' position; refused steps do not
        count).
    """

    per_domain: bool = False

    def __init__(
        self,
        params: Any,
        base: type[Optimizer] | Optimizer,
        *,
        radii: dict[str, float | Schedule],
        sync: str = "global",
        model: nn.Module | None = None,
        on_nonfinite: str = "skip",
        warn_after_skips: int = 3,
        grad_scaler: Any = None,
        clip_grad_norm: float | None = None,
        descent_hook: Callable[[list[torch.Tensor]], None] | None = None,
        **base_kwargs: Any,
    ) -> None:
        self._schedules = {name: as_schedule(name, value) for name, value in radii.items()}
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
            for key, value in base_kwargs.items():
                check_hyperparameters({key: value}, "base optimizer argument")
            if not isinstance(params, torch.Tensor):
                params = list(params)
            for i, group in enumerate(params if _is_groups(params) else []):
                self._check_group(group, f"param_groups[{i}]")
            self.base = base(params, **base_kwargs)
        else:
            raise TypeError(
                f"base must be a torch.optim.Optimizer subclass or instance, got {base!r}"
            )
        for i, group in enumerate(self.base.param_groups):
            self._check_group(group, f"param_groups[{i}]")
        self.sync = check_choice("sync", sync, ("global", "local"))
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, ("skip", "raise"))
        self.warn_after_skips = check_positive_int("warn_after_skips", warn_after_skips)
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
        self._norm_stats: NormStatistics | None = (
            NormStatistics(norm_modules(model)) if model is not None else None
        )
        self.steps = 0
        self.skipped_steps = 0
        self._skips_in_a_row = 0
        self._warned_skips = False
        self._snapshot: list[torch.Tensor] = []
        self._snapshot_key: tuple = ()
        self._left_grads: dict[int, tuple[torch.Tensor, int]] = {}
        self._pending: StepContext | None = None
        self._radii_used: dict[str, list[float]] | None = None
        # whether a data-parallel engine the optimizer was not given (Lightning's or
        # accelerate's DDP) averages each pass's gradient: decided at the first distributed
        # step whose ranks' losses differ (StepContext.detect_engine); None = not yet known
        self._engine_averages: bool | None = None
        self._engine_tries = 0
        # Optimizer.__init__ sets up hooks and step patching; it is given the base's groups
        # and then the group list itself is shared, never copied.
        super().__init__(self.base.param_groups, {})
        self._link()
        self._remember_grads()  # gradients that exist already are stale, never "carried"

    # ------------------------------------------------------------------ torch.optim plumbing
    def _link(self) -> None:
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = self.base.defaults

    def _check_group(self, group: Any, where: str) -> None:
        if not isinstance(group, dict):
            return
        check_hyperparameters(
            {k: v for k, v in group.items() if k not in self._schedules}, where
        )
        for name in self._schedules:
            if name in group:
                group[name] = as_schedule(f"{where} {name}", group[name]) if isinstance(
                    group[name], Schedule) else check_nonnegative(f"{where} {name}", group[name])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "base", None) is not None and self.param_groups is self.base.param_groups:
            self._check_group(param_group, "param_group")
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
        self._remember_grads()  # gradients present at a load are stale, as at construction
        self._radii_used = None

    def _all_params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _group_index(self) -> list[int]:
        return [i for i, g in enumerate(self.param_groups) for _ in g["params"]]

    def _current_radii(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for name, default in self._schedules.items():
            values = []
            for g in self.param_groups:
                sched = g.get(name, default)
                lr = float(g.get("lr", 0.0))
                values.append(sched(self.steps, lr) if isinstance(sched, Schedule) else sched)
            out[name] = values
        return out

    def radius(self, name: str, group: int = 0, *, upcoming: bool = False) -> float:
        """Value of radius ``name`` in param group ``group`` used by the latest step (before
        the first step: the value the first step will use); ``upcoming=True``: the value the
        next step will use (its schedule at the current step and learning rate)."""
        if name not in self._schedules:
            raise KeyError(f"{type(self).__name__} has no radius {name!r}")
        use_last = self._radii_used is not None and not upcoming
        radii = self._radii_used if use_last else self._current_radii()
        return radii[name][group]

    @property
    def closure_calls(self) -> int:
        """Closure calls per step."""
        return self._closure_calls()

    def _closure_calls(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ the step
    def step(self, closure: Closure | Sequence[Closure] | None = None) -> torch.Tensor | None:
        """One step: calls ``closure`` ``closure_calls`` times and the base once; returns the
        detached loss at the unperturbed point (a per-domain method takes a sequence of
        closures). Returns None when the step was skipped for a non-finite value."""
        if self._pending is not None:
            raise RuntimeError(
                "step() called between first_step() and second_step(); call second_step() first"
            )
        closure = self._check_closure(closure)
        ctx = StepContext(self, self._current_radii())
        self._radii_used = ctx.radii
        try:
            loss = self._descent(ctx, closure)
        except NonFiniteStep:
            ctx.restore()
            return self._skip(ctx)
        except BaseException:  # an error (or Ctrl-C) inside a closure: never leave theta perturbed
            ctx.restore()
            ctx.put_back_carried()
            raise
        return self._finish(ctx, loss)

    def _finish(self, ctx: StepContext, loss: torch.Tensor | None) -> torch.Tensor | None:
        """Sync, check, clip and apply the descent gradient in ``p.grad``; advance the step."""
        params, grads = ctx.params, ctx.grads()
        try:
            if self.sync == "local" and ctx.distributed:
                allreduce_mean(grads)  # the one all-reduce of m-sharpness
            # finite iff its 2-norm is (an overflowing norm also counts as non-finite)
            ctx.finite(None, _tree.global_norm(grads))
        except NonFiniteStep:
            return self._skip(ctx)
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm, foreach=True)
        if self.descent_hook is not None:
            self.descent_hook(params)
        if self.grad_scaler is not None:
            torch._foreach_mul_(grads, ctx.scale)
            if not self._scaler_step():
                # the scaler found an overflow in the re-scaled descent gradient and backed
                # off: a skipped step, so no staged state and no after-step term
                self.steps += 1
                self.skipped_steps += 1
                self._remember_grads()
                return None
        else:
            self.base.step()
        self.steps += 1
        self._skips_in_a_row = 0
        for key, (ps, values) in ctx.staged.items():
            for p, v in zip(ps, values):
                self.state[p][key] = v
        self._after_step(ctx)
        self._remember_grads()
        return loss

    def _scaler_step(self) -> bool:
        """``grad_scaler.step(base)``; True when the base optimizer actually stepped (seen
        through the base's public step post-hook)."""
        taken: list[bool] = []
        handle = self.base.register_step_post_hook(lambda *_: taken.append(True))
        try:
            self.grad_scaler.step(self.base)
        finally:
            handle.remove()
        return bool(taken)

    def _after_step(self, ctx: StepContext) -> None:
        """Called after the base step of a step that was taken (after staged state is
        written); a method's post-update term goes here (WSAM's decoupled sharpness)."""

    def _skip(self, ctx: StepContext) -> None:
        self.steps += 1
        self.skipped_steps += 1
        if self.grad_scaler is None:  # a GradScaler's overflow skips are its normal back-off
            self._skips_in_a_row += 1
        if self._skips_in_a_row >= self.warn_after_skips and not self._warned_skips:
            self._warned_skips = True
            warnings.warn(
                f"{type(self).__name__} skipped {self._skips_in_a_row} steps in a row for "
                f"non-finite losses or gradients ({self.skipped_steps} skipped in total); "
                "check the learning rate, the radii and the data",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.grad_scaler is not None:
            self._scaler_skip(ctx)
        elif self.on_nonfinite == "raise":
            self._remember_grads()
            raise NonFiniteStep(f"non-finite loss or gradient at step {self.steps - 1}")
        self._remember_grads()
        return None

    def _remember_grads(self) -> None:
        """Record the gradients this step leaves behind, so the next step can tell them from
        gradients accumulated since (identity and version of each tensor)."""
        self._left_grads = {
            i: (p.grad, p.grad._version)
            for i, p in enumerate(self._all_params()) if p.grad is not None
        }

    def _descent(self, ctx: StepContext, closure: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _descent(ctx, closure)")

    def _check_closure(self, closure: Any) -> Any:
        if self.per_domain:
            from flatlab.optim._domains import check_closures

            return check_closures(closure, owner=type(self).__name__)
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step needs a closure that zeroes grads, runs forward and "
                "backward and returns the loss, got None"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {closure!r}")
        return closure

    # ------------------------------------------------------------------ shell-owned state
    def _snapshot_into(self, params: list[torch.Tensor]) -> None:
        """Copy ``params`` into the reusable snapshot buffer (one parameter-sized buffer)."""
        key = tuple((id(p), p.shape, p.dtype, p.device) for p in params)
        if key == self._snapshot_key:
            _tree.restore_(self._snapshot, params)
        else:
            self._snapshot = _tree.snapshot(params)
            self._snapshot_key = key

    def _set_norms(self, modules: list[nn.Module], compiled: bool) -> None:
        self._norm_stats = NormStatistics(modules)

    def _ddp(self) -> nn.Module | None:
        m = self.model
        if m is not None and isinstance(m, nn.parallel.DistributedDataParallel):
            return m
        return None

    def _engine_reduces(self) -> bool:
        """True when something other than this optimizer averages each pass's gradient over
        the ranks: the DDP module given as ``model=``, or one detected at the first step."""
        return self._ddp() is not None or bool(self._engine_averages)

    def _scaler_skip(self, ctx: StepContext) -> None:
        """Let the GradScaler see an overflow so ``scaler.update()`` backs off the scale."""
        grads = [p.grad for p in self._all_params() if p.grad is not None]
        if not grads:
            return
        if _tree.all_finite(grads):
            grads[0].fill_(float("nan"))
        self.grad_scaler.step(self.base)


class TwoPass(SharpnessAware):
    """A method of two passes per step (SAM and its variants), with davda54/sam's two-step API.

    Subclasses implement ``_ascend(ctx, loss)`` (after the pass at theta: perturb with
    ``ctx.perturb_``; may return data for the combine) and optionally ``_combine(ctx, data)``
    (after the pass at the perturbed point: turn ``p.grad`` into the descent gradient).

    ``step(closure)`` runs both passes. The two-step API does the same with the user's own
    forward/backward passes::

        loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward(); opt.second_step(zero_grad=True)

    and gives the same parameters as ``step(closure)`` (tested). With ``model=`` the norm
    statistics of the second forward are put back, as in ``step``.
    """

    def _closure_calls(self) -> int:
        return 2

    def _ascend(self, ctx: StepContext, loss: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def _combine(self, ctx: StepContext, data: Any) -> None:
        """Default: the gradient at the perturbed point is the descent gradient."""

    def _descent(self, ctx: StepContext, closure: Any) -> torch.Tensor:
        loss = ctx.gradient(closure, first=True)
        data = self._ascend(ctx, loss)
        ctx.gradient(closure)
        self._combine(ctx, data)
        ctx.restore()
        return loss

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """Perturb theta with the gradient now in ``p.grad`` (computed by the user at theta).
        Returns False (and leaves theta alone) when that gradient is not finite."""
        if self._pending is not None:
            raise RuntimeError("first_step() called twice; call second_step() in between")
        ctx = StepContext(self, self._current_radii(), adopt=True)
        self._radii_used = ctx.radii
        try:
            ctx.adopt(first=True)
            data = self._ascend(ctx, None)
        except NonFiniteStep:
            ctx.restore()
            self._skip(ctx)
            return False
        except BaseException:
            ctx.restore()
            raise
        if self._norm_stats:
            self._norm_stats.save()
        self._pending = ctx
        ctx.data = data
        if zero_grad:
            self.zero_grad()
        return True

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore theta and step the base with the gradient now in ``p.grad`` (computed by the
        user at the perturbed point)."""
        ctx = self._pending
        if ctx is None:
            raise RuntimeError("second_step() called without first_step()")
        self._pending = None
        if self._norm_stats:
            self._norm_stats.restore()
        try:
            ctx.adopt(first=False)
            self._combine(ctx, ctx.data)
        except BaseException:
            ctx.restore()
            raise
        ctx.restore()
        self._finish(ctx, None)
        if zero_grad:
            self.zero_grad()


def _is_groups(params: Any) -> bool:
    return isinstance(params, list) and bool(params) and isinstance(params[0], dict)


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
