"""Hessian- and Gauss-Newton-vector products of a model's full-data loss.

For data split into batches ``b`` of sizes ``n_b`` (``N = sum_b n_b``) and a mean-reduced
per-batch loss ``L_b(w) = loss_fn(model(x_b; w), y_b)``, the full-data loss is

    L(w) = sum_b (n_b / N) L_b(w),

so its Hessian-vector product is the size-weighted sum of per-batch products

    H v = sum_b (n_b / N) grad^2 L_b(w) v.

Weighting by ``n_b`` (not ``1 / #batches``) makes the operator over unequal batches equal to
the operator on their concatenation. Each per-batch product is computed with
:mod:`torch.func` forward-over-reverse, ``jvp(grad(L_b), (w,), (v,))`` (Pearlmutter 1994;
the ``R{}`` operator) or with double backward
(``autograd.grad(autograd.grad(L_b, w, create_graph=True), w, v)``), which is faster for small
models on CPU and the fallback for modules without forward-mode support. No autograd graph
lives beyond one batch of one product on the *streamed* path.

On the *cached* path (the default for a tensor pair or a list of batches whose gradient
graphs fit ``memory_budget``), the graph of ``g_b = grad L_b`` (``create_graph=True``) is
built once per batch and kept, and every product is one backward pass through it:
``H_b v = grad_w <g_b, v>`` (see :mod:`flatlab.curvature._graph`). Both paths compute the
same matrix; ``op.path`` says which one was used.

Every model operator also gives the full-data mean gradient ``g = sum_b (n_b / N) grad L_b``
(``op.gradient()``): read from the kept graphs on the cached path, one forward and backward
pass per batch otherwise. Lanczos starts from it (:mod:`flatlab.curvature.eigen`).

The generalized Gauss-Newton matrix (Schraudolph 2002) replaces the Hessian of the network
by its linearization:  ``G v = sum_b (n_b / N) J_b^T H_{ell,b} J_b v``, with ``J_b`` the
Jacobian of the outputs w.r.t. ``w`` and ``H_{ell,b}`` the Hessian of ``loss_fn`` w.r.t.
the outputs; it is PSD for convex losses (cross-entropy, squared error).

The residual ``R = H - G = sum_b (n_b / N) sum_c r_{b,c} grad^2 f_{b,c}`` (``r_b = dL_b / df_b``,
the loss's gradient in the outputs ``f_b``) is the Hessian of the scalar ``<r_b, f_b(w)>``
with ``r_b`` held constant, so one product ``R v`` costs one Hessian-vector product (not an
``H`` and a ``G`` product): :func:`residual_operator`. It vanishes where the outputs are
affine in the parameters, and it is what the trace's Gauss-Newton route estimates
(:mod:`flatlab.curvature.trace`).

Shapes: vectors are flat, of length ``n`` = number of selected parameter entries, in the
dtype and on the device of the parameters (see :mod:`flatlab.curvature._model`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import grad, jvp, vjp, vmap

from flatlab._batches import batches
from flatlab._checks import check_choice, check_positive
from flatlab._ranks import ranks_of, weighted_mean
from flatlab.curvature._graph import (
    GradientGraphs,
    backward_through,
    double_backward_columns,
    gradient_graph,
)
from flatlab.curvature._model import (
    FunctionalLoss,
    LossFn,
    flatten,
    measured_model,
    measurement_mode,
    model_device_dtype,
    resolve_params,
    unflatten,
)
from flatlab.curvature.operator import DenseOperator, LinearOperator

_METHODS = ("auto", "forward_ad", "func", "double_backward")
_PATHS = ("auto", "cached", "streamed")
DEFAULT_MEMORY_BUDGET = 2 * 2**30  # bytes of saved activations the cached path may hold


class _ModelOperator(LinearOperator):
    """Shared data loop: ``A v = sum_b (n_b / N) A_b v`` over the batches of ``data``."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        params: nn.Module | Iterable[torch.Tensor | str] | None,
        eval_mode: bool,
        check_deterministic: bool = True,
        distributed: Any = False,
    ):
        model = measured_model(model)
        names, tensors = resolve_params(model, params)
        device, dtype = model_device_dtype(tensors)
        super().__init__(sum(t.numel() for t in tensors), dtype, device)
        if data is None:
            raise ValueError(
                "data must be a tensor pair, a list of pairs or a DataLoader, got None")
        next(iter(batches(data)))  # fail now on empty or malformed data
        if check_deterministic and not isinstance(data, (tuple, list)):
            _check_deterministic(data)
        self.model, self.data, self.names = model, data, names
        self.params = tensors
        self.eval_mode = bool(eval_mode)
        self.floss = FunctionalLoss(model, loss_fn, names)
        self.ranks = ranks_of(distributed)
        self._vector_checked = self.ranks is None
        if self.ranks is not None:
            self.ranks.check_same("the measured parameters", flatten(tensors),
                                  "broadcast the model from rank 0 before measuring")

    @property
    def group(self) -> Any:
        """The process group the products are summed over (``None``: one process)."""
        return None if self.ranks is None else self.ranks.group

    def _check(self, x: torch.Tensor, ndim: int) -> torch.Tensor:
        x = super()._check(x, ndim)
        if not self._vector_checked:  # the first product: every rank must multiply the same
            self.ranks.check_same("the first vector multiplied", x,
                                  "pass the same init and seed on every rank")
            self._vector_checked = True
        return x

    def _mean(self, total: torch.Tensor, count: float) -> torch.Tensor:
        return weighted_mean(total, count, self.ranks)

    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into tensors shaped like the selected parameters."""
        return unflatten(vector, self.params)

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors into a flat vector."""
        return flatten(tensors)

    def _batch_products(self, primals, tangents, inputs, targets, batched=False):
        """Per-batch products ``A_b t`` (tangents stacked on dim 0 when ``batched``)."""
        raise NotImplementedError  # pragma: no cover

    def gradient(self) -> torch.Tensor:
        """The gradient of the full-data mean loss, ``sum_b (n_b / N) grad L_b`` (shape
        ``(n,)``, reduced over the ranks of a data-parallel operator): one forward and backward
        pass per batch. It is not a product and ``n_matvecs`` does not count it."""
        total, count = None, 0
        with measurement_mode(self.model, self.eval_mode):
            for inputs, targets, n in batches(self.data, device=self.device):
                leaves = [p.detach().requires_grad_() for p in self.params]
                with torch.enable_grad():
                    loss = self.floss(leaves, inputs, targets)
                    g = torch.autograd.grad(loss, leaves, allow_unused=True)
                flat = _flat_gradient(g, self.params)
                total = flat * n if total is None else total.add_(flat, alpha=n)
                count += n
        return self._mean(total, count)

    def _accumulate(self, V: torch.Tensor, batched: bool, point=None) -> torch.Tensor:
        primals = tuple(p.detach() for p in (self.params if point is None else point))
        if batched:
            tangents = tuple(t.movedim(-1, 0) for t in unflatten_cols(V, self.params))
        else:
            tangents = tuple(self.unflatten(V))
        total, count = None, 0
        with measurement_mode(self.model, self.eval_mode), torch.no_grad():
            for inputs, targets, n in batches(self.data, device=self.device):
                out = self._batch_products(primals, tangents, inputs, targets, batched)
                flat = _flat_out(out, batched)
                total = flat * n if total is None else total.add_(flat, alpha=n)
                count += n
        return self._mean(total, count)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._accumulate(v, batched=False)

    def matvec_at(self, point: list[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
        """``A(w') v`` at other values ``w'`` of the selected parameters (shaped like them)."""
        v = self._check(v, 1)
        self.n_matvecs += 1
        return self._accumulate(v, batched=False, point=point)

    def _matmat(self, V: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        cols = []
        for start in range(0, V.shape[1], chunk):
            block = V[:, start : start + chunk]
            try:
                cols.append(self._accumulate(block, batched=True))
            except (RuntimeError, NotImplementedError):  # no vmap rule: one column at a time
                cols.append(torch.stack([self._matvec(c) for c in block.T], dim=1))
        return torch.cat(cols, dim=1)


def _flat_gradient(g, like) -> torch.Tensor:
    """A flat detached gradient, zeros for parameters the loss does not reach."""
    return flatten([torch.zeros_like(p) if gi is None else gi.detach() for gi, p in zip(g, like)])


def _check_deterministic(data: Any) -> None:
    """Iterate ``data`` twice side by side; every product re-iterates it, so it must repeat."""
    first, second = iter(batches(data)), iter(batches(data))
    for i, ((x1, y1, n1), (x2, y2, n2)) in enumerate(zip(first, second)):
        same = n1 == n2 and torch.equal(y1, y2) and (
            torch.equal(x1, x2) if isinstance(x1, torch.Tensor)
            else all(torch.equal(a, b) for a, b in zip(x1, x2)))
        if not same:
            raise RuntimeError(
                f"data must yield the same batches on every pass (batch {i} differed: "
                "shuffling or augmentation?); every Hessian-vector product re-reads it. "
                "Pass check_deterministic=False to skip this check."
            )
    if next(first, None) is not None or next(second, None) is not None:
        raise RuntimeError("data must yield the same number of batches on every pass; "
                           "pass check_deterministic=False to skip this check")


def unflatten_cols(V: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split ``V`` of shape ``(n, m)`` into tensors of shapes ``(*s_i, m)``."""
    out, start = [], 0
    for t in like:
        out.append(V[start : start + t.numel()].reshape(*t.shape, V.shape[1]))
        start += t.numel()
    return out


def _flat_out(parts, batched: bool) -> torch.Tensor:
    if batched:  # each part has shape (m, *s_i) -> (n, m)
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1).T.contiguous()
    return flatten(parts)


class HessianOperator(_ModelOperator):
    """The Hessian of the full-data mean loss as a linear operator (see module docstring).

    Attributes:
        n_matvecs: Hessian-vector products computed so far.
        method: the product kernel: ``"forward_ad"`` (forward-over-reverse with
            ``torch.autograd.forward_ad`` dual tensors), ``"func"`` (``torch.func.jvp`` of
            ``torch.func.grad``) or ``"double_backward"``. ``"auto"`` resolves at the first
            product to double backward on CPU (small models are dispatch-bound and it has the
            least overhead) and forward-over-reverse elsewhere, falling back to double
            backward for modules without forward-mode rules. A streamed ``matmat`` builds
            one gradient graph per batch and back-propagates every column through it
            (double backward), or uses ``torch.func.vmap`` over the columns (the other
            kernels), column by column if that fails.
        path: ``"cached"`` (gradient graphs kept, one backward pass per product) or
            ``"streamed"`` (every product re-runs forward and backward per batch). Requested
            ``"auto"`` resolves at the first product: cached when ``data`` is a tensor pair
            or a list, ``eval_mode`` is on, the kernel is double backward, and the saved
            tensors fit ``memory_budget`` bytes (default 2 GiB); streamed otherwise.
        cache_nbytes: bytes held by the kept graphs (measured while building them).
        gradient_start: Lanczos starts from the gradient by default (:mod:`.eigen`).
    """

    gradient_start = True

    def __init__(self, model, loss_fn, data, params=None, eval_mode=True, method="auto",
                 check_deterministic=True, path="auto", memory_budget=None, distributed=False):
        super().__init__(model, loss_fn, data, params, eval_mode, check_deterministic,
                         distributed)
        self.method = check_choice("method", method, _METHODS)
        self.path = check_choice("path", path, _PATHS)
        if path == "cached" and method in ("func", "forward_ad"):
            raise ValueError(f"path='cached' needs method 'auto' or 'double_backward' (the "
                             f"graph kept is the gradient's), got method={method!r}")
        self.memory_budget = float(DEFAULT_MEMORY_BUDGET if memory_budget is None else
                                   check_positive("memory_budget", memory_budget))
        self._graphs: GradientGraphs | None = None
        self.cache_nbytes = 0

    def _resolve_method(self) -> str:
        if self.method == "auto":
            # small CPU models are dispatch-bound, where double backward is fastest; on an
            # accelerator forward-over-reverse needs less memory (no graph of the gradient)
            self.method = "double_backward" if self.device.type == "cpu" else "forward_ad"
            self._fallback = True
        return self.method

    def _cache(self) -> GradientGraphs | None:
        """The kept gradient graphs, built at the first product (``None``: streamed)."""
        if self.path == "streamed":
            return None
        if self._graphs is not None and not self._graphs.stale(self.params):
            return self._graphs
        forced = self.path == "cached"
        eligible = forced or (isinstance(self.data, (tuple, list)) and self.eval_mode
                              and self.method in ("auto", "double_backward"))
        if not forced and self.ranks is not None:  # every rank takes the same path
            eligible = bool(self.ranks.agree_min(int(eligible)))
        if not eligible:
            self.path = "streamed"
            return None
        with measurement_mode(self.model, self.eval_mode):
            graphs = GradientGraphs(self.floss, self.params, batches(self.data, self.device),
                                    float("inf") if forced else self.memory_budget)
        self.cache_nbytes = graphs.nbytes
        fits = graphs.fits
        if not forced and self.ranks is not None:
            fits = bool(self.ranks.agree_min(int(fits)))
        if not fits:
            self.path = "streamed"
            return None
        self.path, self._graphs = "cached", graphs
        if self.method == "auto":
            self.method = "double_backward"
        return graphs

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        graphs = self._cache()
        if graphs is None:
            return self._accumulate(v, batched=False)
        return self._mean(flatten(graphs.products(self.unflatten(v))), graphs.count)

    def gradient(self) -> torch.Tensor:
        """The full-data mean gradient (see :meth:`_ModelOperator.gradient`); on the cached
        path it is read from the kept graphs, which hold it already, at no extra pass."""
        graphs = self._cache()
        if graphs is None:
            return super().gradient()
        total = None
        for n, _, g, _ in graphs.graphs:
            flat = _flat_gradient(g, graphs.like)
            total = flat * n if total is None else total.add_(flat, alpha=n)
        return self._mean(total, graphs.count)

    def _matmat(self, V: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        graphs = self._cache()
        if graphs is None:
            return super()._matmat(V, chunk)
        cols = [flatten(graphs.products(self.unflatten(V[:, j]))) for j in range(V.shape[1])]
        return self._mean(torch.stack(cols, dim=1), graphs.count)

    def _func(self, primals, tangents, inputs, targets, batched):
        argnums = tuple(range(len(primals)))

        def gradient(*w):
            return grad(lambda *u: self.floss(u, inputs, targets), argnums=argnums)(*w)

        def hvp(*t):
            return jvp(gradient, primals, t)[1]

        with warnings.catch_warnings():  # torch's first forward-AD call scripts decompositions
            warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
            return vmap(hvp)(*tangents) if batched else hvp(*tangents)

    def _forward_ad(self, primals, tangents, inputs, targets, batched):
        if batched:
            return self._func(primals, tangents, inputs, targets, batched)
        leaves = [p.detach().requires_grad_() for p in primals]
        with torch.enable_grad(), fwAD.dual_level(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
            duals = [fwAD.make_dual(p, t) for p, t in zip(leaves, tangents)]
            loss = self.floss(duals, inputs, targets)
            g = torch.autograd.grad(loss, leaves, allow_unused=True)
            out = []
            for gi, p in zip(g, primals):
                tangent = None if gi is None else fwAD.unpack_dual(gi).tangent
                out.append(torch.zeros_like(p) if tangent is None else tangent.detach())
        return out

    def _double_backward(self, primals, tangents, inputs, targets, batched):
        if batched:
            return double_backward_columns(self.floss, primals, tangents, inputs, targets)
        leaves, g, used = gradient_graph(self.floss, primals, inputs, targets)
        return backward_through(leaves, g, used, tangents, primals, retain=False)

    def _batch_products(self, primals, tangents, inputs, targets, batched=False):
        method = self._resolve_method()
        if batched:
            if method == "double_backward":  # one gradient graph, a backward per column
                return double_backward_columns(self.floss, primals, tangents, inputs, targets)
            # torch.func transforms, vmapped over the columns
            return self._func(primals, tangents, inputs, targets, batched)
        kernel = getattr(self, "_" + method)
        try:
            return kernel(primals, tangents, inputs, targets, batched)
        except (RuntimeError, NotImplementedError):
            if not getattr(self, "_fallback", False) or self.method == "double_backward":
                raise
            self.method = "double_backward"
            return self._double_backward(primals, tangents, inputs, targets, batched)


def _output_gradient(loss_of_outputs: Any, outputs: torch.Tensor,
                     targets: torch.Tensor) -> torch.Tensor:
    """``r = d loss / d outputs`` at ``outputs``, a constant (no graph back to the parameters).

    Inside :mod:`torch.func` transforms (the ``"func"`` kernel, a vmapped ``matmat``) by
    ``torch.func.grad``; elsewhere (double backward, the cached graphs, forward-mode duals)
    by ``torch.autograd.grad`` on a detached leaf, since ``torch.func.grad`` refuses the saved
    tensor hooks that measure the cached graphs and autograd refuses functorch's tensors.
    """
    const = outputs.detach()
    if torch._C._functorch.is_functorch_wrapped_tensor(outputs):
        return grad(lambda o: loss_of_outputs(o, targets))(const)
    leaf = const.requires_grad_()
    with torch.enable_grad():
        (r,) = torch.autograd.grad(loss_of_outputs(leaf, targets), leaf)
    return r


class ResidualLoss(FunctionalLoss):
    """``<r, f(w)>`` with ``r = d loss_fn / d f`` held constant: its Hessian in ``w`` is the
    residual ``sum_c r_c grad^2 f_c = H - G`` of ``loss_fn(f(w), targets)``; its gradient is
    the loss's, ``J^T r``. The model's output must be one tensor."""

    def loss_of_outputs(self, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, torch.Tensor):
            raise ValueError("residual_operator needs a model whose output is one tensor, "
                             f"got {type(outputs).__name__}")
        r = _output_gradient(super().loss_of_outputs, outputs, targets)
        return (r * outputs).sum()


class ResidualOperator(HessianOperator):
    """The residual ``R = H - G`` of the full-data mean loss as an operator (module docstring):
    the Hessian of ``sum_b (n_b / N) <r_b, f_b(w)>``, so ``method``, ``path`` and the other
    attributes are those of :class:`HessianOperator`, at the same cost per product."""

    gradient_start = False  # its top eigenvectors are not the loss gradient's directions

    def __init__(self, *args: Any, **kwargs: Any):  # those of HessianOperator
        super().__init__(*args, **kwargs)
        self.floss = ResidualLoss(self.model, self.floss.loss_fn, self.names)


class GGNOperator(_ModelOperator):
    """Generalized Gauss-Newton matrix ``G = sum_b (n_b/N) J_b^T H_ell J_b`` as an operator."""

    def _batch_products(self, primals, tangents, inputs, targets, batched=False):
        def net(*w):
            return self.floss.outputs(w, inputs)

        def loss_grad(o):
            return grad(lambda z: self.floss.loss_of_outputs(z, targets))(o)

        out, pullback = vjp(net, *primals)
        # H_ell (J v) by reverse-over-reverse: H_ell is symmetric, and torch's forward-mode
        # derivative of some losses' backward fails (mse_loss: "ZeroTensors are immutable")
        _, loss_pullback = vjp(loss_grad, out)

        def ggn(*t):
            jv = jvp(net, primals, t)[1]
            (hjv,) = loss_pullback(jv)
            return pullback(hjv)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*torch.jit.script.*", DeprecationWarning)
            return vmap(ggn)(*tangents) if batched else ggn(*tangents)


def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    params: nn.Module | Iterable[torch.Tensor | str] | None = None,
    *,
    eval_mode: bool = True,
    method: str = "auto",
    check_deterministic: bool = True,
    path: str = "auto",
    memory_budget: float | None = None,
    distributed: Any = False,
) -> HessianOperator:
    """Return the Hessian of the full-data mean loss of ``model`` as an operator.

    ``H v = sum_b (n_b / N) grad^2 L_b(w) v`` (products by ``torch.func`` forward-over-reverse).

    Args:
        model: the network; it is never modified.
        loss_fn: called as ``loss_fn(model(inputs), targets)``; must return a mean-reduced
            scalar.
        data: a tensor pair, a list of pairs (unequal sizes are weighted by size) or a
            DataLoader (re-iterated on every product; it must be deterministic).
        params: ``None`` (all trainable parameters), a submodule, or a list of parameter
            tensors / names: the operator is then the matching principal block of ``H``.
        eval_mode: measure with the model in eval mode (default), restoring every module's
            flag afterwards. With ``False``, dropout makes every product random.
        method: ``"auto"``, ``"forward_ad"``, ``"func"`` or ``"double_backward"`` (see
            :class:`HessianOperator`).
        check_deterministic: when ``data`` is an iterable other than a tuple or list (a
            DataLoader), iterate it twice now and raise if the batches differ (shuffling,
            augmentation), since every product re-reads it.
        path: ``"auto"`` (default), ``"cached"`` or ``"streamed"``: keep the gradient graph
            of every batch and back-propagate through it for each product, or recompute it
            (see :class:`HessianOperator`; ``op.path`` reports the choice).
        memory_budget: bytes the cached path may hold (default 2 GiB); over it, ``"auto"``
            streams.
        distributed: ``True`` (the default process group) or a process group: a
            data-parallel measurement. Every rank passes its own shard of the data (sizes
            may differ) and every product is summed over the ranks, so the operator is the
            Hessian of the mean loss over the union of the shards (see
            :mod:`flatlab._ranks`). The ranks must hold the same parameters (checked). A
            DDP-wrapped model is measured through its ``.module``.

    Raises:
        ValueError: for empty data, parameters not in the model, a non-scalar loss
            (at the first product), ``path="cached"`` with a forward-mode ``method``, or
            ``distributed`` ranks whose parameters (or first vectors) differ.
        TypeError: a model with FSDP2 (DTensor) parameters.
        RuntimeError: data that does not repeat (see ``check_deterministic``).

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> H = hessian_operator(net, torch.nn.functional.mse_loss, (x, y))
        >>> H.shape
        (4, 4)
    """
    return HessianOperator(model, loss_fn, data, params, eval_mode, method, check_deterministic,
                           path, memory_budget, distributed)


def ggn_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    params: nn.Module | Iterable[torch.Tensor | str] | None = None,
    *,
    eval_mode: bool = True,
    check_deterministic: bool = True,
    distributed: Any = False,
) -> GGNOperator:
    """Return the generalized Gauss-Newton matrix of the full-data loss as an operator.

    ``G v = sum_b (n_b / N) J_b^T H_ell J_b v``; same arguments as :func:`hessian_operator`.
    The model's outputs must be a single tensor.
    """
    return GGNOperator(model, loss_fn, data, params, eval_mode, check_deterministic,
                       distributed)


def residual_operator(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    params: nn.Module | Iterable[torch.Tensor | str] | None = None,
    *,
    eval_mode: bool = True,
    method: str = "auto",
    check_deterministic: bool = True,
    path: str = "auto",
    memory_budget: float | None = None,
    distributed: Any = False,
) -> ResidualOperator:
    """Return the residual ``R = H - G`` of the full-data loss's Hessian as an operator.

    ``R v = sum_b (n_b / N) sum_c r_{b,c} grad^2 f_{b,c} v``, with ``r_b`` the gradient of
    ``loss_fn`` in the outputs ``f_b`` of batch ``b``: the part of the Hessian the
    Gauss-Newton matrix (:func:`ggn_operator`) leaves out. One product costs one
    Hessian-vector product. It is zero for a model affine in the selected parameters, and
    indefinite in general. Same arguments as :func:`hessian_operator`; the model's output
    must be one tensor.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
        ...                           torch.nn.Linear(4, 2)).double()
        >>> x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
        >>> CE = torch.nn.functional.cross_entropy
        >>> R = residual_operator(net, CE, (x, y)).to_dense()
        >>> H = hessian_operator(net, CE, (x, y)).to_dense()
        >>> G = ggn_operator(net, CE, (x, y)).to_dense()
        >>> bool(torch.allclose(R, H - G, atol=1e-12))
        True
    """
    return ResidualOperator(model, loss_fn, data, params, eval_mode, method,
                            check_deterministic, path, memory_budget, distributed)


def as_operator(
    obj: Any,
    *,
    loss_fn: Any = None,
    data: Any = None,
    params: Any = None,
    **kwargs: Any,
) -> LinearOperator:
    """Return ``obj`` as an operator.

    ``obj`` may be an operator (returned as is), a square tensor (wrapped in
    :class:`DenseOperator`), or an ``nn.Module``, in which case ``loss_fn`` and ``data`` are
    required and the result is its :func:`~flatlab.curvature.hessian_operator` (``kwargs``
    are passed on; ``distributed=`` is only for a model).

    Raises:
        ValueError: if a model is given without ``loss_fn`` or ``data``, or ``distributed``
            with an operator or tensor.
        TypeError: for anything else.
    """
    if isinstance(obj, nn.Module):
        if loss_fn is None or data is None:
            raise ValueError(
                "loss_fn and data must be given when measuring a model, got "
                f"loss_fn={loss_fn!r}, data={'None' if data is None else type(data).__name__}"
            )
        return hessian_operator(obj, loss_fn, data, params=params, **kwargs)
    if kwargs.get("distributed"):
        raise ValueError("distributed applies to a model: build the operator with "
                         "hessian_operator(model, loss_fn, data, distributed=...) instead, got "
                         f"a {type(obj).__name__}")
    if isinstance(obj, torch.Tensor):
        return DenseOperator(obj)
    if callable(getattr(obj, "matvec", None)) and hasattr(obj, "shape"):
        return obj
    raise TypeError(
        "op must be a LinearOperator, a square tensor or an nn.Module, "
        f"got {type(obj).__name__}"
    )
