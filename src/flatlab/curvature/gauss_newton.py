"""The Hessian's trace through its Gauss-Newton part: exact where the network allows it.

For a mean loss ``L(w) = (1/N) sum_i ell(f(x_i; w), y_i)`` with outputs ``f_i`` of size ``D``,

    H = G + R,   G = (1/N) sum_i J_i^T Lam_i J_i,   R = (1/N) sum_i sum_c r_ic grad^2_w f_ic,

with ``J_i = d f_i / d w`` (``D x n``), ``Lam_i = d^2 ell / d f_i^2`` (``D x D``) and
``r_i = d ell / d f_i``. Write ``Lam_i = sum_c lam_ic q_ic q_ic^T`` (its eigendecomposition).
Then the Gauss-Newton trace is a sum of per-example gradient norms, with no probes:

    tr G = (1/N) sum_i sum_c lam_ic ||J_i^T q_ic||^2,

``J_i^T q_ic`` being the gradient of the scalar ``q_ic . f(x_i; w)``: ``D`` vectorized
per-example gradient passes (``torch.func.vmap`` over ``grad``) per batch of examples.

**When tr H = tr G exactly.** ``tr R = sum_k tr R_kk`` over the parameter tensors ``w_k``
(the diagonal blocks). If the outputs are affine in each tensor ``w_k`` alone, the others
held fixed, then ``grad^2_{w_k} f = 0``, every ``R_kk`` vanishes and ``tr H = tr G``. This is
the case, almost everywhere, for networks built of linear and convolution layers, ReLU-type
activations, max or average pooling, residual additions and eval-mode BatchNorm, where each
tensor enters every path once: for a fixed activation pattern, ``f`` is multi-affine in the
tensors. It is *not* the case for tanh, GELU, softmax attention or training-mode BatchNorm,
or for a weight used twice on one path.

**Linear blocks, exact whatever the activation.** For the weight ``W`` and bias ``b`` of an
``nn.Linear`` layer ``z = W h + b`` applied once per forward to one vector ``h_i`` per
example, with ``W`` and ``b`` used nowhere else, ``h`` does not depend on them and

    tr H_WW = (1/N) sum_i ||h_i||^2 sum_j d_ij,   tr H_bb = (1/N) sum_i sum_j d_ij,

``d_ij = d^2 ell_i / d z_ij^2`` (the rest of the network included): ``d_out`` second
directional derivatives per example, by nested forward-mode AD through a forward hook that
adds a perturbation to ``z`` (:func:`linear_blocks`, checked numerically). For an MLP with
tanh or GELU activations every nonlinear tensor is such a block, and the trace is exact.

:func:`nonlinear_tensors` checks the condition on the given inputs: for each tensor it draws
a random direction ``V_k`` (scaled to ``||w_k||``) and computes the second directional
derivative ``d^2/dt^2 f(w_k + t V_k)`` by nested forward-mode AD. Piecewise-linear
operations propagate it as exact zeros; a tensor is reported as nonlinear when
``||f''|| > 100 eps (||f'|| + ||f||)``. A random direction finds a nonzero quadratic form
with probability one, but only on the examples checked (data-dependent control flow that
is nonlinear on other inputs would go unseen).

Shapes: outputs ``(B, *out)`` with ``D = prod(out)``; ``Lam`` ``(B, D, D)``; per-example
gradients ``(b, *w_k.shape)`` for a chunk of ``b`` examples. Cost: ``D`` per-example gradient
passes per chunk, about ``D`` Hessian-vector products' worth for the whole data on CPU; the
loss must be a mean of per-example terms and the model must treat examples independently
(both checked on the first batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad, hessian, jvp, vmap

from flatlab._batches import batches
from flatlab._ranks import ranks_of
from flatlab.curvature._model import (
    FunctionalLoss,
    measured_model,
    measurement_mode,
    resolve_params,
)
from flatlab.curvature._progress import Meter

# bytes of per-example gradients one vectorized pass may hold
CHUNK_BYTES = 2**28
# (direction, example) pairs one vectorized second-derivative pass of a Linear layer holds
DIRECTIONS_PER_PASS = 4096
# the fewest XTrace probes of a residual (trace.MINIMUM_PROBES["xtrace"])
MINIMUM_RESIDUAL = 4


class NotApplicable(ValueError):
    """The Gauss-Newton route does not apply: the inputs or outputs are not one tensor, the
    model couples examples, or the loss is not a mean of per-example terms."""


@dataclass(frozen=True)
class GGNTrace:
    """The exact Gauss-Newton trace, or a partial one when a budget ended it.

    Attributes:
        value: ``tr G`` (the mean of ``per_example`` over all examples when complete).
        stderr: 0 when every example was done; otherwise the standard error of the mean
            of the examples done (with the finite-population correction, when ``N`` is known).
        passes: per-example gradient passes spent (``D`` per chunk of examples).
        examples: examples done (over all ranks).
        per_example: ``sum_c lam_ic ||J_i^T q_ic||^2`` of this rank's examples done, ``(k,)``.
        converged: every example was done.
        split_value: ``sum_k tr G_kk`` over the tensors ``split`` named (0 when none), on the
            same examples as ``value``.
    """

    value: float
    stderr: float
    passes: int
    examples: int
    per_example: torch.Tensor
    converged: bool
    split_value: float = 0.0


def _outputs_of(floss: FunctionalLoss, tensors: Sequence[torch.Tensor]):
    """``x -> f(x; w)`` for one example (no batch dimension in or out)."""

    def one(x: torch.Tensor) -> torch.Tensor:
        out = floss.outputs(tensors, x.unsqueeze(0))
        if not isinstance(out, torch.Tensor):
            raise NotApplicable("method='gauss_newton' needs a model whose output is one tensor, "
                             f"got {type(out).__name__}")
        return out.squeeze(0)

    return one


def _check_inputs(inputs: Any) -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise NotApplicable("method='gauss_newton' needs batches whose inputs are one tensor, got "
                         f"{type(inputs).__name__}")
    return inputs


def _check_batch(floss: FunctionalLoss, tensors, inputs, targets) -> None:
    """The model treats the examples independently and the loss is their mean."""
    with torch.no_grad():
        out = floss.outputs(tensors, inputs)
        try:
            one = vmap(_outputs_of(floss, tensors))(inputs)
        except (RuntimeError, ValueError) as e:  # data-dependent control flow, batch statistics
            raise NotApplicable(
                "method='gauss_newton' needs a model torch.func.vmap can run one example at a "
                f"time, and this one fails ({str(e).splitlines()[0][:120]}); use "
                "method='xtrace'") from e
        scale = float(out.abs().max()) + 1e-30
        if float((out - one).abs().max()) > 1e-4 * scale:
            raise NotApplicable(
                "method='gauss_newton' needs a model that treats examples independently: its "
                "outputs on the batch differ from its outputs one example at a time (a "
                "training-mode BatchNorm?); use eval_mode=True or method='xtrace'")
        loss = floss.loss_of_outputs(out, targets)
        each = torch.stack([floss.loss_of_outputs(o.unsqueeze(0), t.unsqueeze(0))
                            for o, t in zip(out, targets)])
        if abs(float(loss) - float(each.mean())) > 1e-4 * (abs(float(loss)) + 1e-30):
            raise NotApplicable(
                "method='gauss_newton' needs a loss that is the mean of per-example terms: "
                f"loss_fn on the batch gives {float(loss):.6g}, the mean of its per-example "
                f"values {float(each.mean()):.6g} (a weighted or summed loss?); use "
                "method='xtrace'")


def _chunk_trace(floss: FunctionalLoss, tensors, x: torch.Tensor, t: torch.Tensor,
                 mask: Sequence[bool] = ()) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``sum_c lam_ic ||J_i^T q_ic||^2`` for the examples of one chunk, ``(b,)``, the same
    sum over the tensors ``mask`` selects only, ``(b,)``, and the passes spent (an
    eigen-direction whose ``|lam|`` is within round-off of 0 on every example of the chunk,
    such as cross-entropy's constant direction, is not run)."""
    one = _outputs_of(floss, tensors)
    with torch.no_grad():
        out = vmap(one)(x)
        shape = out.shape[1:]
        flat = out.reshape(out.shape[0], -1)

        def ell(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return floss.loss_of_outputs(o.reshape(shape).unsqueeze(0), y.unsqueeze(0))

        try:
            lam_mat = vmap(hessian(ell))(flat, t)
        except RuntimeError:  # a loss vmap cannot batch (.item(), one_hot): one at a time
            lam_mat = torch.stack([hessian(ell)(o, y) for o, y in zip(flat, t)])
        lam_mat = lam_mat.to(torch.float64)
        lam_mat = (lam_mat + lam_mat.transpose(1, 2)) / 2
        lam, q = torch.linalg.eigh(lam_mat)
    q = q.to(flat.dtype)
    skip = 64 * torch.finfo(flat.dtype).eps * float(lam.abs().max())

    def along(w: Sequence[torch.Tensor], xi: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return (_outputs_of(floss, w)(xi).reshape(-1) * u).sum()

    per_example = vmap(grad(along), in_dims=(None, 0, 0))
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    part = torch.zeros_like(total)
    passes = 0
    for c in range(lam.shape[1]):
        if float(lam[:, c].abs().max()) <= skip:
            continue
        gs = per_example(list(tensors), x, q[:, :, c])
        sq = [g.reshape(g.shape[0], -1).to(torch.float64).pow(2).sum(1) for g in gs]
        total += lam[:, c] * sum(sq)
        if any(mask):
            part += lam[:, c] * sum(s for s, m in zip(sq, mask) if m)
        passes += 1
    return total, part, passes


def ggn_trace(
    model: Any,
    loss_fn: Any,
    data: Any,
    params: Any = None,
    *,
    eval_mode: bool = True,
    distributed: Any = False,
    meter: Meter | None = None,
    total_examples: int | None = None,
    exact: Sequence[str] = (),
    split: Sequence[str] = (),
    checked: bool = False,
) -> GGNTrace:
    """The trace of the generalized Gauss-Newton matrix, exactly (module docstring).

    With ``exact`` (names from :func:`linear_blocks`), those tensors' Gauss-Newton blocks
    are replaced by their exact Hessian blocks: ``value`` is then
    ``sum_{k not in exact} tr G_kk + sum_{k in exact} tr H_kk``.

    Args:
        model, loss_fn, data, params, eval_mode, distributed: as for
            :func:`~flatlab.curvature.hessian_operator` (``distributed``: each rank its shard,
            one all-reduce of the sums at the end).
        meter: budgets and progress (one unit per per-example gradient pass); when a budget
            ends, the examples done so far give the estimate (``converged=False``). Not with
            ``distributed`` (the ranks' example counts differ).
        total_examples: ``N``, when known, for the finite-population correction of a partial
            result's error.
        split: tensors (not in ``exact``) whose share of ``tr G`` is also reported,
            as ``split_value``, at no extra pass.
        checked: the first batch was already checked (by :func:`plan`): not again.

    Raises:
        ValueError: inputs that are not one tensor, a model that couples examples, a loss that
            is not a mean of per-example terms, or a meter with ``distributed``.
    """
    model = measured_model(model)
    names, tensors = resolve_params(model, params)
    floss = FunctionalLoss(model, loss_fn, names)
    exact = [n for n in names if n in set(exact)]
    if set(split) & set(exact):
        raise ValueError(f"split and exact overlap: {sorted(set(split) & set(exact))}")
    gn_names = [n for n in names if n not in set(exact)]
    gn_floss = FunctionalLoss(model, loss_fn, gn_names)
    by_name = dict(zip(names, tensors))
    modules = dict(model.named_modules())
    layers: dict[nn.Module, tuple[bool, bool]] = {}
    for n in exact:
        m, attr = _owner(modules, n)
        w_sel, b_sel = layers.get(m, (False, False))
        layers[m] = (w_sel or attr == "weight", b_sel or attr == "bias")
    lin_floss = FunctionalLoss(model, loss_fn, [])
    ranks = ranks_of(distributed)
    if ranks is not None and meter is not None and (
            meter.max_matvecs is not None or meter.max_seconds is not None):
        raise ValueError("method='gauss_newton' takes no max_matvecs / max_seconds budget "
                         "with distributed=: the ranks' example counts differ")
    meter = meter or Meter("trace (gauss_newton)", None, progress=False, unit="passes")
    w = [p.detach() for p in tensors]
    gn_w = [by_name[n].detach() for n in gn_names]
    mask = [n in set(split) for n in gn_names]
    n_params = sum(p.numel() for p in gn_w) or sum(p.numel() for p in w)
    chunk = max(1, CHUNK_BYTES // (n_params * w[0].element_size()))
    parts: list[torch.Tensor] = []
    split_parts: list[torch.Tensor] = []
    passes, last, converged = 0, 0, True
    with measurement_mode(model, eval_mode):
        for inputs, targets, _ in batches(data, device=w[0].device):
            inputs = _check_inputs(inputs)
            if not checked:
                _check_batch(floss, w, inputs, targets)
                checked = True
            for start in range(0, inputs.shape[0], chunk):
                x, t = inputs[start:start + chunk], targets[start:start + chunk]
                if ranks is None and parts and meter.allowed(last) < last:
                    converged = False  # the next chunk would not fit a budget
                    break
                vals = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
                part, last = vals, 0
                if gn_names:
                    vals, part, last = _chunk_trace(gn_floss, gn_w, x, t, mask)
                if layers:
                    more, p = _chunk_linear(lin_floss, layers, x, t)
                    vals, last = vals + more, last + p
                parts.append(vals)
                split_parts.append(part)
                passes += last
                meter.update(last)
            if not converged:
                break
    per_example = torch.cat(parts)
    total, count = per_example.sum(), per_example.numel()
    part = torch.cat(split_parts).sum()
    if ranks is not None:
        buf = ranks.sum(torch.stack([total, total.new_tensor(float(count)), part]))
        total, count, part = buf[0], int(buf[1]), buf[2]
    value = float(total / count)
    stderr = 0.0
    if not converged:
        k = per_example.numel()
        stderr = float(per_example.std() / k**0.5) if k > 1 else float("inf")
        if total_examples:
            stderr *= max(0.0, 1.0 - k / total_examples) ** 0.5
    return GGNTrace(value, stderr, passes, count, per_example, converged,
                    float(part / count))


def nonlinear_tensors(
    model: Any,
    data: Any,
    params: Any = None,
    *,
    examples: int = 2,
    seed: int = 0,
    eval_mode: bool = True,
    distributed: Any = False,
) -> list[str]:
    """Names of the selected parameter tensors the outputs are not affine in (see the module
    docstring): an empty list means ``tr H = tr G`` on the examples checked.

    Args:
        model, params, eval_mode: as for :func:`ggn_trace`.
        data: the first ``examples`` inputs of its first batch are checked.
        seed: seed of the random directions.
        distributed: each rank checks its own first examples; a tensor is nonlinear when
            any rank finds it so (one all-reduce of the flags), so every rank agrees.
    """
    model = measured_model(model)
    names, tensors = resolve_params(model, params)
    floss = FunctionalLoss(model, lambda o, t: o.sum(), names)  # only its outputs are used
    w = [p.detach() for p in tensors]
    inputs, _, _ = next(iter(batches(data, device=w[0].device)))
    x = _check_inputs(inputs)[:examples]
    gen = torch.Generator().manual_seed(int(seed))
    eps = torch.finfo(w[0].dtype).eps
    directions = []
    for p in w:
        v = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        directions.append((v * ((float(p.norm()) or 1.0) / float(v.norm()))).to(p))
    n_params = sum(p.numel() for p in w)
    group = max(1, CHUNK_BYTES // (n_params * w[0].element_size()))
    flags = torch.zeros(len(w), dtype=torch.float64, device=w[0].device)

    def second(*tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def first(*ws: torch.Tensor) -> torch.Tensor:
            return jvp(lambda *w2: floss.outputs(w2, x), ws, tangents)[1]

        return jvp(first, tuple(w), tangents)

    with measurement_mode(model, eval_mode):
        with torch.no_grad():
            out_norm = float(floss.outputs(w, x).norm())
        for lo in range(0, len(w), group):  # directions lo..hi-1, one tensor each, batched
            hi = min(len(w), lo + group)
            stacked = []
            for j, p in enumerate(w):
                t = torch.zeros((hi - lo, *p.shape), dtype=p.dtype, device=p.device)
                if lo <= j < hi:
                    t[j - lo] = directions[j]
                stacked.append(t)
            d1, d2 = vmap(second)(*stacked)
            for j in range(hi - lo):
                if float(d2[j].norm()) > 100 * eps * (float(d1[j].norm()) + out_norm):
                    flags[lo + j] = 1.0
    ranks = ranks_of(distributed)
    if ranks is not None:
        flags = ranks.sum(flags.to(ranks.device))
    return [n for n, f in zip(names, flags.tolist()) if f > 0]


def _owner(modules: dict[str, nn.Module], name: str) -> tuple[Any, str]:
    """The module holding the parameter ``name`` (``None`` if not a module's) and its slot."""
    owner, _, attr = name.rpartition(".")
    return modules.get(owner), attr


def _linear_candidates(model: nn.Module, names: Sequence[str]) -> dict[nn.Module, list[str]]:
    """Those of ``names`` that are the ``weight`` or ``bias`` of an ``nn.Linear`` (its own
    ``forward``, no forward hooks), held by no other module slot; grouped by module."""
    slots: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                slots[id(p)] = slots.get(id(p), 0) + 1
    named = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out: dict[nn.Module, list[str]] = {}
    for n in names:
        m, attr = _owner(modules, n)
        if (m is None or attr not in ("weight", "bias")
                or type(m).forward is not nn.Linear.forward or m._forward_hooks
                or m._parameters.get(attr) is not named[n] or slots[id(named[n])] != 1):
            continue
        out.setdefault(m, []).append(n)
    return out


class _Inject:
    """Forward hooks on Linear modules: record ``||h||^2`` of their inputs (``capture``), or
    add a perturbation ``delta`` to one module's output (``add``). Removed on exit."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.target: nn.Module | None = None
        self.delta: torch.Tensor | None = None
        self.inputs: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in self.modules}
        self.capture = False

    def _hook(self, module, args, out):
        if self.capture:
            self.inputs[module].append(args[0].detach())
        if module is self.target and self.delta is not None:
            return out + self.delta
        return None

    def __enter__(self) -> _Inject:
        self.handles = [m.register_forward_hook(self._hook) for m in self.modules]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def linear_blocks(model: Any, data: Any, names: Sequence[str], *, examples: int = 2,
                  seed: int = 0, eval_mode: bool = True, distributed: Any = False) -> list[str]:
    """Those of ``names`` whose diagonal Hessian block :func:`ggn_trace` can take exactly
    (``exact=``): the weight ``W`` and bias ``b`` of an ``nn.Linear`` layer ``z = W h + b``
    called once per forward on inputs ``h`` of shape ``(B, d_in)`` (one vector per example),
    ``W`` and ``b`` entering the outputs only through ``z``.

    Then ``h`` does not depend on ``W`` or ``b``, and with ``d_ij = d^2 ell_i / d z_ij^2``
    (the diagonal of the loss Hessian in the layer's outputs, the rest of the network
    included)

        tr H_WW = (1/N) sum_i ||h_i||^2 sum_j d_ij,   tr H_bb = (1/N) sum_i sum_j d_ij,

    exactly, whatever the activations: ``d_out`` second directional derivatives per example.

    Checked on the first ``examples`` inputs: the call count and shapes by a forward hook,
    and "only through ``z``" numerically. Along a random rank-one direction
    ``(V_W, V_b) = (e_j u^T, c e_j)``, which moves each ``z_i`` by ``s_i e_j`` with
    ``s_i = u . h_i + c``, the outputs' second derivative must equal their second derivative
    along the perturbation ``s_i e_j`` added to ``z`` (a weight also used elsewhere, e.g.
    tied by direct attribute access, fails this). With ``distributed``, each rank checks its
    own first examples and a tensor is kept only when every rank keeps it.
    """
    model = measured_model(model)
    cands = _linear_candidates(model, names)
    ranks = ranks_of(distributed)
    if not cands and ranks is None:
        return []
    floss = FunctionalLoss(model, lambda o, t: o.sum(), [])
    inputs, _, _ = next(iter(batches(data, device=next(model.parameters()).device)))
    x = _check_inputs(inputs)[:examples]
    gen = torch.Generator().manual_seed(int(seed) + 1)
    named = dict(model.named_parameters())
    keep: list[str] = []
    with measurement_mode(model, eval_mode), _Inject(list(cands)) as inj:
        inj.capture = True
        with torch.no_grad():
            out0 = floss.outputs([], x)
        inj.capture = False
        scale = float(out0.norm()) if isinstance(out0, torch.Tensor) else 0.0
        for m, ns in cands.items():
            seen = inj.inputs[m]
            if len(seen) != 1 or seen[0].dim() != 2 or seen[0].shape[0] != x.shape[0]:
                continue  # called twice, or on tokens (the weight shared along a dimension)
            h, w = seen[0], m.weight
            j = int(torch.randint(w.shape[0], (1,), generator=gen))
            u = torch.randn(w.shape[1], generator=gen, dtype=torch.float64).to(w)
            c = float(torch.randn(1, generator=gen))
            sel = list(ns)  # the module's candidate tensors, perturbed together
            vw, s = [], torch.zeros(x.shape[0], dtype=w.dtype, device=w.device)
            for n in sel:
                v = torch.zeros_like(named[n])
                if n.endswith("weight"):
                    v[j], s = u, s + h @ u
                else:
                    v[j], s = c, s + c
                vw.append(v)
            tangent = torch.zeros(x.shape[0], w.shape[0], dtype=w.dtype, device=w.device)
            tangent[:, j] = s
            pl = FunctionalLoss(model, lambda o, t: o.sum(), sel)
            p0 = [named[n].detach() for n in sel]

            def along_params(*ws, pl=pl, vw=vw):
                return jvp(lambda *w2: pl.outputs(w2, x), ws, tuple(vw))[1]

            def along_z(d, tangent=tangent, m=m):
                def f(d2):
                    inj.target, inj.delta = m, d2
                    try:
                        return floss.outputs([], x)
                    finally:
                        inj.target, inj.delta = None, None
                return jvp(f, (d,), (tangent,))[1]

            # first and second derivatives: a second, affine use of W changes the first
            d1p, d2p = jvp(along_params, tuple(p0), tuple(vw))
            d1z, d2z = jvp(along_z, (torch.zeros_like(tangent),), (tangent,))
            eps = torch.finfo(w.dtype).eps
            size = sum(float(v.norm()) for v in (d1p, d2p, d1z, d2z)) + scale
            if float((d1p - d1z).norm()) + float((d2p - d2z).norm()) <= 1e3 * eps * size:
                keep.extend(ns)
    if ranks is not None:
        flags = torch.tensor([float(n in keep) for n in names], dtype=torch.float64)
        flags = ranks.sum(flags.to(ranks.device)).cpu()
        keep = [n for n, f in zip(names, flags.tolist()) if f == ranks.world]
    return [n for n in names if n in keep]


def _chunk_linear(floss: FunctionalLoss, layers: dict[nn.Module, tuple[bool, bool]],
                  x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``sum_k tr H_kk`` per example over the Linear tensors of ``layers`` (module ->
    (weight selected, bias selected)), ``(b,)`` in float64, and the passes (``d_out`` per
    layer): ``sum_j d_ij (||h_i||^2 [weight] + 1 [bias])`` (see :func:`linear_blocks`)."""
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    passes = 0
    with _Inject(list(layers)) as inj:
        inj.capture = True
        with torch.no_grad():
            floss.outputs([], x)
        inj.capture = False
        for m, (has_w, has_b) in layers.items():
            h2 = inj.inputs[m][0].to(torch.float64).pow(2).sum(1)
            d_out = m.out_features

            def ell(d: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor, m=m) -> torch.Tensor:
                inj.target, inj.delta = m, d
                try:
                    out = floss.outputs([], xi.unsqueeze(0))
                finally:
                    inj.target, inj.delta = None, None
                return floss.loss_of_outputs(out, yi.unsqueeze(0))

            def second(e: torch.Tensor, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
                def first(d: torch.Tensor) -> torch.Tensor:
                    return jvp(lambda d2: ell(d2, xi, yi), (d,), (e,))[1]
                return jvp(first, (torch.zeros_like(e),), (e,))[1]

            per = vmap(vmap(second, in_dims=(None, 0, 0)), in_dims=(0, None, None))
            eye = torch.eye(d_out, dtype=m.weight.dtype, device=x.device)
            group = max(1, min(d_out, DIRECTIONS_PER_PASS // max(1, x.shape[0])))
            diag = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            for lo in range(0, d_out, group):
                diag += per(eye[lo:lo + group], x, t).to(torch.float64).sum(0)
            total += diag * (h2 * float(has_w) + float(has_b))
            passes += d_out
    return total, passes


@dataclass(frozen=True)
class Plan:
    """What :func:`~flatlab.curvature.trace.gauss_newton_trace` will do, from
    :func:`plan`.

    Attributes:
        nonlinear: tensors the outputs are not affine in (:func:`nonlinear_tensors`).
        exact: those of them taken exactly as Linear blocks (:func:`linear_blocks`).
        residual: the rest, whose principal block the trace takes exactly or estimates
            (:func:`~flatlab.curvature.trace._residual_block`; empty: the trace is exact).
        passes: passes per chunk of examples, at most: ``D`` (outputs per example) for the
            Gauss-Newton part plus ``d_out`` per exact Linear layer.
    """

    nonlinear: list[str]
    exact: list[str]
    residual: list[str]
    passes: int


def plan(model: Any, loss_fn: Any, data: Any, params: Any = None, *, probes: int = 100,
         total: bool = False, seed: int = 0, eval_mode: bool = True,
         distributed: Any = False) -> Plan:
    """Check that the Gauss-Newton route applies (on the first batch) and plan it.

    Args:
        probes: with ``total=False`` (``method="gauss_newton"``), the residual's probes: the
            Linear blocks are taken exactly when all of them fit, ``D + sum d_out <=
            probes``; otherwise their tensors stay in the residual, which XTrace estimates
            with ``probes`` products whatever its size (so a wide MLP does not cost
            thousands of passes). With ``total=True`` (``method="auto"``), the whole budget:
            the passes, plus two products per residual probe and at least
            ``MINIMUM_RESIDUAL`` probes when a residual is left, must fit in it.
        total: as above; then :class:`NotApplicable` is raised as soon as the route cannot
            fit (no second-derivative checks are run for nothing).

    Raises:
        NotApplicable: on every rank when it does not apply on some rank (one all-reduce of
            a flag, so that the ranks take the same route).
    """
    model = measured_model(model)
    names, tensors = resolve_params(model, params)
    floss = FunctionalLoss(model, loss_fn, names)
    w = [p.detach() for p in tensors]
    ranks = ranks_of(distributed)
    error: NotApplicable | None = None
    out_size = 0
    try:
        inputs, targets, _ = next(iter(batches(data, device=w[0].device)))
        inputs = _check_inputs(inputs)
        with measurement_mode(model, eval_mode):
            _check_batch(floss, w, inputs, targets)
            with torch.no_grad():
                out_size = floss.outputs(w, inputs[:1])[0].numel()
    except NotApplicable as e:
        error = e
    if ranks is not None:
        failed = ranks.sum(torch.tensor([float(error is not None)], dtype=torch.float64,
                                        device=ranks.device))
        if float(failed[0]) > 0 and error is None:
            error = NotApplicable("method='gauss_newton' does not apply on another rank")
    if error is not None:
        raise error
    # the same on every rank from here: the model and its output size are
    if total and out_size > probes:
        raise NotApplicable(f"{out_size} outputs per example need more passes than the "
                            f"{probes} products")
    nonlinear = nonlinear_tensors(model, data, params, seed=seed, eval_mode=eval_mode,
                                  distributed=distributed)
    cands = _linear_candidates(model, nonlinear)
    modules = dict(model.named_modules())
    covered = all(any(n in ns for ns in cands.values()) for n in nonlinear)
    # auto: a residual needs the products of its probes beside the passes
    room = 2 * MINIMUM_RESIDUAL if total else 0
    exact: list[str] = []
    if cands and out_size + sum(m.out_features for m in cands) + (
            0 if covered else room) <= probes:
        exact = linear_blocks(model, data, nonlinear, seed=seed, eval_mode=eval_mode,
                              distributed=distributed)

    def passes_of(names_: list[str]) -> int:
        return out_size + sum(m.out_features
                              for m in {_owner(modules, n)[0] for n in names_})

    if total and len(exact) < len(nonlinear) and passes_of(exact) + room > probes:
        if out_size + room > probes:
            raise NotApplicable("the Gauss-Newton route leaves no room for its residual's "
                                f"probes within {probes} products")
        exact = []
    return Plan(nonlinear, exact, [n for n in nonlinear if n not in exact], passes_of(exact))
