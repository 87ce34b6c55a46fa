"""One sharpness-aware step's facts and the operations a method uses: :class:`StepContext`.

The shell (:class:`flatlab.optim.base.SharpnessAware`) builds one ``StepContext`` per step and
hands it to the method's ``_descent(ctx, closure)``. Everything a step needs to know (the
current radius of every parameter group, the GradScaler's scale, whether the run is
distributed, the gradients carried in from before the step, whether the parameters are
perturbed) lives here, never on the optimizer. The context alone owns the passes, the
snapshot and the restore, so a method is only its math:

* ``loss = ctx.gradient(closure, first=...)``: one pass. Every pass starts from cleared
  gradients, so ``p.grad`` afterwards is this pass's own gradient, plus the *carried* gradient
  ``c`` (gradients already in ``p.grad`` when ``step`` was called, e.g. the earlier
  micro-batches of Lightning's ``accumulate_grad_batches``). The closure is validated here:
  no backward, a loss that does not require grad, an unreduced loss or ``None`` each get their
  own error.
* ``ctx.perturb_(direction, radius, scale)``: ``theta_g += radius_g * scale * direction`` for
  every parameter group ``g`` whose radius is non-zero (a zero-radius group is never touched);
  the first call saves theta into the optimizer's one reusable snapshot buffer.
* ``ctx.restore()``: theta copied back exactly (never by subtraction).
* ``ctx.finite(loss, *values)``: one host sync; raises :class:`NonFiniteStep` unless all are
  finite (agreed over ranks where ranks may disagree).

Gradient accumulation semantics: the carried gradient ``c`` is the gradient of micro-batches
that can no longer be re-evaluated, so it enters every pass as a fixed term, taken at theta:
pass ``k`` sees ``c + grad L_own(theta_k)``. For SAM this means the ascent uses the
accumulated gradient ``c + g(theta)`` and the descent gradient is ``c + g(theta + e)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from flatlab.optim import _tree
from flatlab.optim._fsdp import GatheredParameters, to_shards
from flatlab.optim._norms import discover_norm_modules

__all__ = ["ClosureError", "NonFiniteStep", "StepContext", "allreduce_mean"]

ENGINE_TRIES = 8  # first steps that may look for an engine averaging the gradient


class NonFiniteStep(RuntimeError):
    """Raised inside a step when a loss or gradient is not finite (the step is skipped)."""


class ClosureError(ValueError):
    """The closure broke the protocol (no backward, no_grad, unreduced loss, None)."""


def allreduce_mean(tensors: list[torch.Tensor], group: Any = None) -> None:
    """Average ``tensors`` over the ranks of ``group`` (None: all) with one all-reduce of a
    flat buffer."""
    if not tensors:
        return
    flat = torch._utils._flatten_dense_tensors(tensors)
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    for t, f in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
        t.copy_(f)


_NOT_SCALAR = "grad can be implicitly created only for scalar outputs"
_NO_GRAD = "does not require grad and does not have a grad_fn"


class StepContext:
    """The facts and operations of one step (module docstring).

    Attributes:
        params: the parameters that take part in this step (those with a gradient after the
            first pass, or with a carried gradient), in param-group order.
        carried: True when gradients were carried into the step (accumulation).
        scale: the GradScaler's scale for this step, or None.
        distributed: True in an initialized process group of more than one rank.
        sharded: True when the parameters are FSDP2 shards (DTensors on a 1-D mesh).
        passes: closure calls so far.
        staged: method state staged with :meth:`stage_state`, written after a taken step.
    """

    def __init__(self, opt: Any, radii: dict[str, list[float]], adopt: bool = False) -> None:
        self.opt = opt
        self.radii = radii  # name -> current value per param group
        self.scale: float | None = (
            float(opt.grad_scaler.get_scale()) if opt.grad_scaler is not None else None
        )
        self.distributed = dist.is_available() and dist.is_initialized() and (
            dist.get_world_size() > 1
        )
        self.all_params: list[torch.Tensor] = opt._all_params()
        # FSDP2: parameters and gradients are DTensor shards; FSDP has already averaged each
        # pass's gradient over the ranks, and every norm is reduced over the mesh (_tree).
        # Also at one rank (one GPU): the shards are then whole DTensors, and a graph pass
        # still needs the unsharded parameters
        self._mesh_group = _tree.sharded_group(self.all_params)
        self.sharded = self._mesh_group is not None
        if self.sharded and self.distributed and opt.sync == "local":
            raise ValueError(
                "sync='local' (m-sharpness) is not supported with FSDP2-sharded parameters: "
                "FSDP reduces every pass's gradient over the ranks, so no rank has its own "
                "gradient to perturb with; use sync='global'"
            )
        self.group_of: list[int] = opt._group_index()
        self.params: list[torch.Tensor] = []
        self._index: list[int] = []  # position of each of params in all_params
        # FSDP2 graph pass (_fsdp): the unsharded parameters, and dL/dp with respect to them
        # (full size, this rank's batch), aligned with all_params; None outside one
        self._gathered: GatheredParameters | None = None
        self._unsharded: list[torch.Tensor] | None = None
        self._graph: list[torch.Tensor | None] | None = None
        self._graph_calls = 0  # calls of the graph-keeping backward in this pass
        self._group: list[int] = []
        self._carried: dict[int, torch.Tensor] = {} if adopt else self._take_carried()
        self.carried = bool(self._carried)
        self.perturbed = False
        self.passes = 0
        self._norms_frozen = False
        self.data: Any = None  # what a two-step method keeps between its steps
        self.after: Any = None  # what a method hands to its own _after_step
        self.staged: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}

    # ------------------------------------------------------------------ method state
    def stage_state(self, key: str, values: Sequence[torch.Tensor]) -> None:
        """Stage ``opt.state[p][key] = value`` for each of :attr:`params` (``values`` aligned
        with them). The shell writes staged state after the base step of a step that was
        taken, so a skipped or refused step leaves the method's state untouched."""
        if len(values) != len(self.params):
            raise ValueError(
                f"stage_state({key!r}) got {len(values)} tensors for {len(self.params)} params"
            )
        self.staged[key] = (list(self.params), list(values))

    # ------------------------------------------------------------------ carried gradients
    def _take_carried(self) -> dict[int, torch.Tensor]:
        """Gradients present at the start of the step that were written since the previous
        step (or since the optimizer was built): the shell records the gradients it leaves
        behind, and those present at construction, by identity and version. Then every
        ``p.grad`` is cleared."""
        left = self.opt._left_grads
        carried: dict[int, torch.Tensor] = {}
        for i, p in enumerate(self.all_params):
            g = p.grad
            if g is None:
                continue
            mark = left.get(i) if left else None
            if mark is None or mark[0] is not g or mark[1] != g._version:
                carried[i] = g.detach()
            p.grad = None
        if carried:
            values = list(carried.values())
            if self.scale is not None:
                torch._foreach_mul_(values, 1.0 / self.scale)
        return carried

    def put_back_carried(self) -> None:
        """After a refused step: ``p.grad`` is the carried gradient again (None elsewhere), so
        the gradients of a failed pass are never mistaken for accumulated ones."""
        for i, p in enumerate(self.all_params):
            c = self._carried.get(i)
            if c is not None and self.scale is not None:
                c = c * self.scale
            p.grad = c

    # ------------------------------------------------------------------ passes
    def gradient(
        self, closure: Callable[..., Any], *, first: bool = False, graph: bool = False,
        keep_norms_frozen: bool = False,
    ) -> torch.Tensor:
        """Run ``closure`` once and return its loss (detached, 0-d); afterwards ``p.grad`` of
        every parameter in :attr:`params` is ``c + grad L(theta_now)``, unscaled and averaged
        over ranks when ``sync="global"`` needs it.

        ``first=True`` is the unperturbed pass: it may update norm statistics and it fixes
        :attr:`params`. ``graph=True`` hands the closure a backward function that keeps the
        gradient's graph (``p.grad`` then carries it, for Hessian-vector products); with
        ``keep_norms_frozen`` the norm statistics are restored only by :meth:`release_norms`
        (after the graph is used, since autograd saved them).
        """
        opt = self.opt
        if self.passes:
            for p in self.all_params:
                p.grad = None
        self.drop_graph()
        if graph and self.sharded:
            self._gather()
        self.passes += 1
        norms = opt._norm_stats
        freeze = not first and norms is not None and bool(norms)
        if freeze:
            norms.save()
        try:
            with contextlib.ExitStack() as stack:
                ddp = opt._ddp()
                if ddp is not None and opt.sync == "local":
                    stack.enter_context(ddp.no_sync())
                stack.enter_context(torch.enable_grad())
                if first and norms is None:
                    loss, found, compiled = discover_norm_modules(
                        lambda: self._call(closure, graph)
                    )
                    opt._set_norms(found, compiled)
                else:
                    loss = self._call(closure, graph)
        finally:
            if freeze and not keep_norms_frozen:
                norms.restore()
        self._norms_frozen = freeze and keep_norms_frozen
        loss = self._check_loss(loss)
        if graph and not self._graph_calls and any(p.grad is not None for p in self.all_params):
            # its own loss.backward() kept no graph: every product would be zero, and exact
            # GAM would silently be its base optimizer
            raise ClosureError(
                f"{type(self.opt).__name__}'s closure did not call the backward function it "
                "was given: call backward(loss), not loss.backward(), so that the gradient "
                "keeps the graph its Hessian-vector products need"
            )
        if first and not graph:
            self.detect_engine(loss)
        # a graph pass is never reduced here: autograd.grad bypasses DDP's reducer, and an
        # in-place all-reduce would cut the graph; the method reduces what it derives from
        # the gradient with reduce_ (GAM: g and H g^)
        self._collect(first, reduce=not graph)
        return loss

    def adopt(self, *, first: bool) -> None:
        """Take the gradients the user computed (two-step API) as this pass's gradient."""
        self.passes += 1
        self._collect(first)

    def release_norms(self) -> None:
        """Restore norm statistics kept frozen by ``gradient(..., keep_norms_frozen=True)``."""
        if self._norms_frozen:
            self.opt._norm_stats.restore()
            self._norms_frozen = False

    def _call(self, closure: Callable[..., Any], graph: bool) -> Any:
        try:
            if graph:
                self._graph_calls = 0
                return closure(self._graph_backward)
            return closure()
        except RuntimeError as err:
            text = str(err)
            if _NOT_SCALAR in text:
                raise ClosureError(
                    "the closure called backward on an unreduced loss (a tensor with more than "
                    "one element); reduce it, e.g. loss.mean(), and return that scalar"
                ) from err
            if _NO_GRAD in text:
                raise ClosureError(
                    "the closure's loss does not require grad, so backward failed: did the "
                    "closure compute it under torch.no_grad() or torch.inference_mode()?"
                ) from err
            raise

    def _graph_backward(self, loss: torch.Tensor) -> None:
        """``backward`` that keeps the graph: ``p.grad += dL/dp`` with ``create_graph=True``,
        assigned out of place (so no parameter-gradient reference cycle). Under FSDP2 the
        gradient is with respect to the unsharded parameters, kept apart from ``p.grad``."""
        self._graph_calls += 1
        if self._gathered is not None:
            self._unsharded = self._gathered.unshard()
        inputs = self._unsharded if self._gathered is not None else self.all_params
        found = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        for i, g in enumerate(found):
            if g is None:
                continue
            if self._graph is not None:
                self._graph[i] = g if self._graph[i] is None else self._graph[i] + g
            else:
                p = self.all_params[i]
                p.grad = g if p.grad is None else p.grad + g

    def _gather(self) -> None:
        """Start an FSDP2 graph pass: the unsharded parameters are held until
        :meth:`drop_graph` (module ``_fsdp``)."""
        if self.opt.model is None:
            raise ValueError(
                f"{type(self.opt).__name__} with exact Hessian-vector products on FSDP2-sharded "
                "parameters needs model=, the fully_shard-ed module the closure runs: the "
                "products are taken with respect to its unsharded parameters"
            )
        self._gathered = GatheredParameters(self.opt.model, self.all_params)
        self._graph = [None] * len(self.all_params)

    # ------------------------------------------------------------------ graph passes
    def graph_grads(self) -> list[torch.Tensor]:
        """After a ``graph=True`` pass: the gradients that carry their graph, aligned with
        :attr:`params` (``p.grad``; under FSDP2 the full-size gradients with respect to the
        unsharded parameters, this rank's own, not yet averaged: :meth:`reduce_` them)."""
        if self._graph is not None:
            return [self._graph[i] for i in self._index]
        return self.grads()

    def graph_params(self) -> list[torch.Tensor]:
        """The tensors :meth:`graph_grads` differentiate: :attr:`params`, or under FSDP2 the
        unsharded parameters of the pass (held unsharded through its backward)."""
        if self._gathered is not None:
            return [self._unsharded[i] for i in self._index]
        return self.params

    def drop_graph(self) -> None:
        """End an FSDP2 graph pass: the unsharded parameters resharded and the graph's
        gradients dropped (elsewhere the graph lives in ``p.grad`` until :meth:`set_grads`
        replaces it). A no-op outside one; also run by every pass and by :meth:`restore`."""
        if self._gathered is not None:
            self._gathered.release()
            self._gathered, self._unsharded, self._graph = None, None, None

    def to_params(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors derived from a graph pass (and reduced), laid out as :attr:`params`: under
        FSDP2 each full tensor is cut to this rank's shard (no communication)."""
        if self.sharded:
            return to_shards(tensors, self.params)
        return list(tensors)

    def _check_loss(self, loss: Any) -> torch.Tensor:
        if loss is None:
            raise ClosureError(
                "the closure returned None; it must zero the grads, run forward and backward "
                "and return the loss"
            )
        if not isinstance(loss, torch.Tensor):
            try:
                loss = torch.as_tensor(float(loss))
            except (TypeError, ValueError):
                raise ClosureError(
                    f"the closure must return the loss as a tensor or a number, got "
                    f"{type(loss).__name__}"
                ) from None
        if loss.numel() != 1:
            raise ClosureError(
                f"the closure returned an unreduced loss of shape {tuple(loss.shape)}; return a "
                "scalar, e.g. loss.mean()"
            )
        return loss.detach().reshape(())

    def reduce_(self, tensors: list[torch.Tensor]) -> None:
        """Average ``tensors`` over ranks in place when ``sync="global"`` needs it (with or
        without DDP, and under FSDP2 over the mesh's ranks): for what a method computes from
        a graph pass (module docstring)."""
        if self.distributed and self.opt.sync == "global":
            allreduce_mean(tensors, self._mesh_group)

    def _collect(self, first: bool, reduce: bool = True) -> None:
        """Align ``p.grad`` with :attr:`params`, add the carried gradient, unscale, reduce."""
        graph = self._graph  # an FSDP2 graph pass: gradients of the unsharded parameters
        found = graph if graph is not None else [p.grad for p in self.all_params]
        if first:
            self._index = [i for i, g in enumerate(found) if g is not None or i in self._carried]
            self.params = [self.all_params[i] for i in self._index]
            self._group = [self.group_of[i] for i in self._index]
            own = [found[i] for i in self._index if found[i] is not None]
            if not own:
                raise ClosureError(
                    "the closure ran no backward: no parameter received a gradient (call "
                    "loss.backward() inside the closure)"
                )
            if any(g.is_sparse for g in own):
                raise ValueError(
                    f"{type(self.opt).__name__} does not support sparse gradients, got a sparse "
                    "gradient"
                )
        elif all(found[i] is None for i in self._index):
            raise ClosureError(
                f"the closure ran no backward in pass {self.passes}: no parameter received a "
                "gradient (call loss.backward() inside the closure)"
            )
        like = self._unsharded if graph is not None else self.all_params
        for i in self._index:
            if found[i] is None:
                found[i] = torch.zeros_like(like[i])
                if graph is None:
                    self.all_params[i].grad = found[i]
        grads = [found[i] for i in self._index]
        if self.scale is not None:
            torch._foreach_mul_(grads, 1.0 / self.scale)
        if self._carried:
            # under FSDP2 a graph pass's gradient is full size: the carried (already reduced)
            # shard is gathered to match; averaging c + g_r over ranks gives c + g
            pairs = [(found[i], self._carried[i]) for i in self._index if i in self._carried]
            if graph is not None:
                pairs = [(a, _tree.full(b)) for a, b in pairs]
            torch._foreach_add_([a for a, _ in pairs], [b for _, b in pairs])
        if (reduce and self.opt.sync == "global" and self.distributed
                and not self.opt._engine_reduces() and not self.sharded):
            allreduce_mean(grads)

    def detect_engine(self, loss: torch.Tensor) -> None:
        """Decide, once, whether a data-parallel engine the optimizer was not handed averages
        each pass's gradient (a model wrapped in DDP by Lightning or accelerate, with
        ``model=`` not given). Right after a first pass, the ranks' losses are compared with
        their gradient norms: one all-reduce of four numbers, at the first distributed step only.
        Losses that differ with gradients equal to the bit mean an engine averaged them.
        Equal losses (the same data on every rank), or gradients that are zero or not finite,
        decide nothing, and the next step tries again, up to ``ENGINE_TRIES`` steps (then: no
        engine).

        An engine that averages makes ``sync="global"``'s own all-reduce redundant, so it is
        skipped. ``sync="local"`` cannot work then, because no rank has its own gradient to
        perturb with, and it is refused with the remedy instead of silently running
        ``"global"``.
        """
        opt = self.opt
        if not self.distributed or self.sharded or opt._ddp() is not None:
            return
        if opt._engine_averages is None:
            opt._engine_averages = self._engine_averaged(loss)
            opt._engine_tries += 1
            if opt._engine_averages is None and opt._engine_tries >= ENGINE_TRIES:
                # the ranks keep seeing the same data: then "local" equals "global" and the
                # optimizer's own all-reduce changes nothing, so stop asking
                opt._engine_averages = False
        if opt._engine_averages and opt.sync == "local":
            raise ValueError(
                "sync='local' needs the DistributedDataParallel module as model=: this rank's "
                "gradient was already averaged over the ranks by a data-parallel engine the "
                "optimizer was not given, so no rank has its own gradient to perturb with "
                "(under Lightning, pass model=self.trainer.strategy.model in "
                "configure_optimizers)"
            )

    def _engine_averaged(self, loss: torch.Tensor) -> bool | None:
        """True/False when the ranks' first-pass losses differ and their gradients do / do not
        agree to the bit; None when this pass cannot tell (see :meth:`detect_engine`)."""
        # every rank joins the all-reduce, also one whose closure ran no backward (it adds a
        # zero, which decides nothing; _collect then reports the closure)
        loss = loss.detach().to(torch.float64).reshape(())
        norm = _tree.global_norm([p.grad for p in self.all_params if p.grad is not None])
        mine = torch.stack([loss, norm.to(loss.device, torch.float64)])
        both = torch.cat([mine, -mine])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        loss_hi, norm_hi, loss_lo, norm_lo = both.tolist()
        loss_lo, norm_lo = -loss_lo, -norm_lo
        if not (math.isfinite(loss_hi) and math.isfinite(norm_hi) and norm_lo > 0.0):
            return None
        if loss_hi == loss_lo:
            return None
        return norm_hi == norm_lo

    def grads(self) -> list[torch.Tensor]:
        """The current ``p.grad`` of :attr:`params` (the tensors themselves, not copies)."""
        return [p.grad for p in self.params]

    def set_grads(self, grads: Sequence[torch.Tensor]) -> None:
        """Make ``grads`` (aligned with :attr:`params`) the gradients, e.g. the descent one."""
        for p, g in zip(self.params, grads):
            p.grad = g

    # ------------------------------------------------------------------ radii
    def radius(self, name: str) -> float:
        """The radius ``name`` of the first parameter group (the constructor's by default)."""
        return self.radii[name][0]

    def radius_groups(self, name: str) -> list[tuple[float, list[int] | None]]:
        """``[(radius, indices into params), ...]`` for each distinct radius value (indices
        None: every parameter)."""
        values = self.radii[name]
        if len(set(values)) == 1:
            return [(values[0], None)]
        out: dict[float, list[int]] = {}
        for i, g in enumerate(self._group):
            out.setdefault(values[g], []).append(i)
        return list(out.items())

    def any_radius(self, name: str) -> bool:
        return any(v != 0.0 for v in self.radii[name])

    # ------------------------------------------------------------------ perturb / restore
    def perturb_(
        self, direction: Sequence[torch.Tensor], radius: str | float, scale: float = 1.0
    ) -> None:
        """``theta_g += r_g * scale * direction`` per group, ``r_g`` the group's value of radius
        ``radius`` (or the number ``radius`` for every group); zero-radius groups untouched.
        The first call of a step saves theta."""
        self.save()
        with torch.no_grad():
            self._add_by_radius(self.params, direction, radius, scale)

    def add_to_grads_(
        self, vector: Sequence[torch.Tensor], radius: str | float, scale: float = 1.0
    ) -> None:
        """``p.grad += r_g * scale * vector`` per group (e.g. GAM's ``alpha rho h`` term)."""
        self._add_by_radius(self.grads(), vector, radius, scale)

    def _add_by_radius(
        self, dst: list[torch.Tensor], src: Sequence[torch.Tensor], radius: str | float,
        scale: float,
    ) -> None:
        groups = (
            [(float(radius), None)] if not isinstance(radius, str) else self.radius_groups(radius)
        )
        for r, idx in groups:
            if r == 0.0 or scale == 0.0:
                continue
            if idx is None or len(idx) == len(dst):
                torch._foreach_add_(dst, list(src), alpha=r * scale)
            else:
                torch._foreach_add_([dst[i] for i in idx], [src[i] for i in idx], alpha=r * scale)

    def save(self) -> None:
        """Save theta into the optimizer's snapshot buffer (once per step)."""
        if not self.perturbed:
            self.opt._snapshot_into(self.params)
            self.perturbed = True

    def restore(self, *, keep: bool = False) -> None:
        """Copy the saved theta back exactly; ``keep=True`` stays ready for another perturbation
        from theta (the snapshot stays valid). Without ``keep`` it also ends an FSDP2 graph
        pass (:meth:`drop_graph`), so a step that fails midway leaves the model resharded."""
        if not keep:
            self.drop_graph()
        if self.perturbed:
            _tree.restore_(self.params, self.opt._snapshot)
            self.perturbed = keep

    # ------------------------------------------------------------------ checks
    def finite(self, loss: torch.Tensor | None, *values: torch.Tensor) -> list[float]:
        """One host sync: return ``values`` as floats, raising :class:`NonFiniteStep` unless
        ``loss`` and all ``values`` are finite (agreed over ranks in a "local" or FSDP2 run,
        where the losses are each rank's own)."""
        items = [v.detach().reshape(()) for v in values]
        if loss is not None:
            items.append(loss.detach().reshape(()))
        out: list[float] = []
        if items:
            device = items[0].device
            out = torch.stack([t.to(device, torch.float64) for t in items]).tolist()
        ok = all(math.isfinite(v) for v in out)
        if self.distributed and (self.opt.sync == "local" or self.sharded):
            flag = torch.tensor([float(ok)], device=items[0].device if items else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            ok = bool(flag.item() == 1.0)
        if not ok:
            raise NonFiniteStep(f"non-finite loss or gradient at step {self.opt.steps}")
        return out[: len(values)]
