"""Extreme eigenvalues of a symmetric operator: thick-restart Lanczos and power iteration.

Lanczos (Lanczos 1950; thick restart: Wu & Simon 2000, SIAM J. Matrix Anal. Appl. 22(2)).
From a unit start vector ``q_1`` it builds an orthonormal basis ``Q_j = [q_1 .. q_j]``
(shape ``(n, j)``) of the Krylov space ``span{q_1, A q_1, ..., A^{j-1} q_1}`` with

    w = A q_j,   h = Q_j^T w,   w <- w - Q_j h   (twice: full reorthogonalization),
    beta_j = ||w||,   q_{j+1} = w / beta_j,

so ``A Q_j = Q_j T_j + beta_j q_{j+1} e_j^T`` with ``T_j = Q_j^T A Q_j`` (``j x j``). The Ritz
pairs ``(theta_i, Q_j s_i)`` of ``T_j = S diag(theta) S^T`` have residual norms
``||A y_i - theta_i y_i|| = beta_j |S_{j,i}|``, known without another product; a pair is
converged when that is ``<= tol * max_i |theta_i|`` (tol relative to the spectral norm
estimate). For a symmetric matrix the eigenvalue error is at most the residual, and about
``residual^2 / gap`` (Parlett, *The Symmetric Eigenvalue Problem*, Thm 11.7.1, with ``gap``
the distance from ``theta_i`` to the rest of the spectrum). ``stop="value"`` stops on that
bound instead: ``max(min(r_i, r_i^2 / gap_i), |theta_i - theta_i'|) <= tol * max|theta|``,
with ``gap_i`` estimated from the other Ritz pairs as ``min_l (|theta_i - theta_l| - r_l)``
(``r_i`` alone while that is not positive) and ``theta_i'`` the previous step's Ritz value.
The tolerance is then on the eigenvalue, as in PyHessian's relative-change rule, and the
residual is only about ``sqrt(tol)``. The gap is an estimate: when the top eigenvalues lie
within about ``tol`` of each other it is too large and the error can exceed ``tol``
(measured in ``benchmarks/curvature.py --part stop-rules``: up to 9.5x ``tol`` on such a
cluster, where PyHessian's rule reaches 6x and the residual rule stays under ``tol``). Either
rule bounds the distance to *some* eigenvalue: on a spectrum with no gap at the top a Ritz
value can settle within ``tol`` of the second one (the table's "even" rows). When the basis
reaches ``krylov_dim`` vectors the method restarts *thick*: it keeps the wanted Ritz vectors
(plus as many next-best ones) and ``q_{j+1}``, with ``T = [[diag(theta), beta s], [beta s^T,
.]]``, so no work is thrown away.
Convergence is checked after every product, so a warm start (``init`` = the previous
eigenvector, as a training-time monitor does) stops after a handful of products.

The start vector. Lanczos needs about ``log(1 / |<q_1, u_1>|) / sqrt(gap)`` steps to find
``u_1``, and a random ``q_1`` has ``|<q_1, u_1>| ~ 1 / sqrt(n)``. The loss gradient ``g``
of a network lies mostly in its top Hessian eigenspace (Gur-Ari, Roberts & Dyer 2018,
"Gradient descent happens in a tiny subspace"; Papyan 2020 traces both to the class means of
the per-example gradients). So for the top of the spectrum (``which="largest"`` or
``"magnitude"``) of a model's Hessian, the default start is

    q_1 = (g / ||g|| + r / ||r||) / ||g / ||g|| + r / ||r|| ||,

where ``r`` is the seeded Gaussian vector. The ``r`` half means no eigenvector is missed
where ``g`` has no component along it: its overlap is at worst about ``1/sqrt(2)`` of a
random start's, which costs ``log(sqrt 2) / sqrt(gap)`` steps at most. The gradient is free
on the cached path, where the kept graphs hold it, and one pass over the data otherwise. It
is measured in ``benchmarks/curvature.py --part resnet`` and recorded in docs/benchmarks.md.
On a CIFAR ResNet-20 (272k parameters) at three initialisations the overlap
``|<g, u_1>| / ||g||`` is 0.5 to 0.83, and the top eigenvalue at tol 1e-3 takes 2 to 2.5
fewer products (7 or 8 instead of 9 to 11); fitted, 0.19 and 1 fewer. On trained networks of
700 to 3,700 parameters, where the overlap is 0.01 to 0.07, the count changes by 0 to +1.
``which="smallest"`` starts at random: the gradient says nothing about the bottom of the
spectrum, and there it measured -2 to +7 products. So does the Gauss-Newton operator, where
it measured -1.5 to +1 on the small networks (``init="gradient"`` asks for it).

Power iteration ``v <- A v / ||A v||`` converges to the largest-magnitude eigenvalue as
``|lambda_2 / lambda_1|^t``; further eigenpairs by orthogonalizing against the ones found
(deflation, as PyHessian does). It is here for comparison; Lanczos needs far fewer products.

Shapes: ``values (k,)``, ``vectors (n, k)`` (columns), ``residuals (k,)``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from flatlab._checks import check_choice, check_positive, check_positive_int
from flatlab.curvature._krylov import (  # noqa: F401 - EigenResult is this module's API
    _WHICH,
    EigenResult,
    _default_tol,
    _orthogonalize,
    _select,
    _start,
    _work_dtype,
)
from flatlab.curvature._progress import Meter
from flatlab.curvature.block_lanczos import block_lanczos
from flatlab.curvature.hvp import as_operator


def lanczos(
    op: Any,
    k: int = 1,
    which: str = "largest",
    *,
    tol: float | None = None,
    max_matvecs: int | None = None,
    krylov_dim: int | None = None,
    init: Any = None,
    seed: int | None = None,
    max_seconds: float | None = None,
    progress: Any = False,
    stop: str = "residual",
) -> EigenResult:
    """Thick-restart Lanczos with full reorthogonalization (see module docstring).

    Args:
        op: a :class:`~flatlab.curvature.operator.LinearOperator` or a square tensor.
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"largest"``, ``"smallest"`` (algebraic) or ``"magnitude"``.
        tol: relative residual tolerance (default 1e-6 in float64, 1e-4 in float32, ten
            times the machine epsilon in half precision). The basis is float32 or float64.
        max_matvecs: product budget (default ``max(300, 40 k)``).
        krylov_dim: basis size before a restart (default ``max(2k + 10, 20)``, at most n).
        init: the start: ``None`` (default) is ``"gradient"`` for ``which="largest"`` or
            ``"magnitude"`` on a model's Hessian (:func:`~flatlab.curvature.hessian_operator`)
            and ``"random"`` otherwise; ``"gradient"`` is the loss gradient mixed with the
            seeded random vector (module docstring; any operator with a ``gradient()``, the
            Gauss-Newton one too); ``"random"`` the seeded random vector alone; a
            vector ``(n,)``, several ``(n, m)`` (their sum is used) or an
            :class:`EigenResult` (its vectors): a warm start. ``result.start`` says which
            was used.
        seed: seed of the random vector.
        max_seconds: wall-clock budget; when it (or ``max_matvecs``) ends first, the current
            Ritz pairs are returned with ``converged=False``.
        progress: a progress bar on stderr when it is a terminal (see
            :mod:`flatlab.curvature._progress`).
        stop: ``"residual"`` (default): every wanted pair has ``||A y - theta y|| <= tol *
            max|theta|``; ``"value"``: every wanted eigenvalue's error bound ``min(r, r^2 /
            gap)`` is (module docstring), which needs fewer products for the same ``tol``.
    """
    op = as_operator(op)
    n = op.shape[0]
    k = check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= the operator dimension n={n}, got {k}")
    which = check_choice("which", which, _WHICH)
    stop = check_choice("stop", stop, _STOPS)
    tol = _default_tol(op.dtype) if tol is None else check_positive("tol", tol)
    max_matvecs = max(300, 40 * k) if max_matvecs is None else check_positive_int(
        "max_matvecs", max_matvecs)
    m = min(n, max(2 * k + 10, 20) if krylov_dim is None else check_positive_int(
        "krylov_dim", krylov_dim))
    if m <= k and m < n:
        raise ValueError(f"krylov_dim must be > k={k}, got {m}")
    dtype, device = _work_dtype(op.dtype), op.device
    eps = torch.finfo(op.dtype).eps
    start = _start_kind(op, init, which)

    Q = torch.empty(n, m, dtype=dtype, device=device)  # the basis: m vectors at most
    Q[:, 0] = _start(n, k, init if start == "given" else None, dtype, device, seed)
    S = torch.zeros(m, m, dtype=torch.float64)  # projected matrix T = Q^T A Q
    j, used, prev = 0, 0, None
    gen = torch.Generator().manual_seed(12345 if seed is None else int(seed) + 1)
    meter = Meter(f"eigenvalues (lanczos, k={k})", None, max_matvecs=max_matvecs,
                  max_seconds=max_seconds, progress=progress, ranks=getattr(op, "ranks", None))
    if start == "gradient":  # inside the meter: on the streamed path it is a pass
        q, start = _gradient_start(op, Q[:, 0])
        Q[:, 0] = q
    while True:
        w = op.matvec(Q[:, j]).to(dtype)
        used += 1
        meter.update(1)
        w, h = _orthogonalize(w, Q[:, : j + 1])
        hh = h.to(torch.float64).cpu()
        S[: j + 1, j] = hh
        S[j, : j + 1] = hh
        beta = float(w.norm())
        theta, svec = torch.linalg.eigh(S[: j + 1, : j + 1])
        order = _select(theta, which)
        scale = max(float(theta.abs().max()), torch.finfo(dtype).tiny)
        resid = beta * svec[j].abs()
        want = order[:k]
        if stop == "residual":
            bound = resid[want]
        else:  # the gap bound, and the last step's change (a gap estimate can be too large)
            bound = _value_bound(theta, resid, want)
            moved = ((theta[want] - prev).abs() if prev is not None and len(prev) == len(want)
                     else torch.full_like(bound, float("inf")))
            bound, prev = torch.maximum(bound, moved), theta[want]
        done = j + 1 >= k and bool((bound <= tol * scale).all())
        exhausted = j + 1 == n
        if done or exhausted or meter.exhausted:
            break
        if beta <= 10 * eps * scale:  # invariant subspace: continue from a fresh direction
            r = torch.randn(n, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            w, _ = _orthogonalize(r, Q[:, : j + 1])
            w = w / w.norm()
            beta = 0.0
        else:
            w = w / beta
        if j + 1 < m:
            Q[:, j + 1] = w
            S[j + 1, j] = S[j, j + 1] = beta
            j += 1
            continue
        # thick restart: keep the wanted Ritz vectors and as many next-best ones
        keep = order[: min(m - 1, max(k, (m + k) // 2))]
        s = svec[:, keep]
        Q[:, : len(keep)] = Q[:, : j + 1] @ s.to(dtype=dtype, device=device)
        Q[:, len(keep)] = w
        S.zero_()
        p = len(keep)
        S[:p, :p] = torch.diag(theta[keep])
        S[p, :p] = S[:p, p] = beta * s[j]
        j = p
    s = svec[:, want].to(dtype=dtype, device=device)
    vectors = Q[:, : j + 1] @ s
    values = theta[want].to(dtype=dtype, device=device)
    residuals = resid[want].to(dtype=dtype, device=device)
    meter.close()
    converged = done or exhausted
    return EigenResult(values, vectors, residuals, used, converged, which, "lanczos", start)


_STOPS = ("residual", "value")
_STARTS = ("gradient", "random")


def _start_kind(op: Any, init: Any, which: str) -> str:
    """``"given"`` (a vector or result), ``"random"`` or ``"gradient"`` (see :func:`lanczos`)."""
    if init is not None and not isinstance(init, str):
        return "given"
    if init is None:  # where it was measured to help: a model's Hessian, top of the spectrum
        top = which != "smallest" and getattr(op, "gradient_start", False)
        return "gradient" if top else "random"
    has_gradient = callable(getattr(op, "gradient", None))
    init = check_choice("init", init, _STARTS)
    if init == "gradient" and not has_gradient:
        raise ValueError(f"init='gradient' needs an operator built from a model "
                         f"(hessian_operator, ggn_operator), got {type(op).__name__}")
    return init


def _gradient_start(op: Any, r: torch.Tensor) -> tuple[torch.Tensor, str]:
    """``(g / ||g|| + r) / ||.||`` for the unit random vector ``r``, and the start's name;
    ``r`` alone (``"random"``) when the gradient is zero or not finite."""
    g = op.gradient().to(dtype=r.dtype, device=r.device)
    norm = g.norm()
    if not (torch.isfinite(norm) and norm > 0):
        return r, "random"
    q = g / norm + r
    return q / q.norm(), "gradient"


def _value_bound(theta: torch.Tensor, resid: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Error bounds ``min(r_i, r_i^2 / gap_i)`` of the Ritz values ``theta[want]``, with
    ``gap_i = min_{l != i} |theta_i - theta_l| - r_l`` (the bound is ``r_i`` where that is not
    positive, or with no other Ritz value). Shapes: ``theta, resid (j,)``, ``want (k,)``."""
    r = resid[want]
    if theta.numel() < 2:
        return r
    dist = (theta[want, None] - theta[None, :]).abs() - resid[None, :]
    dist[torch.arange(len(want)), want] = float("inf")  # not its own neighbour
    gap = dist.min(dim=1).values
    quad = torch.where(gap > 0, r**2 / gap.clamp_min(torch.finfo(gap.dtype).tiny), r)
    return torch.minimum(r, quad)


def power_iteration(
    op: Any,
    k: int = 1,
    which: str = "magnitude",
    *,
    tol: float | None = None,
    max_matvecs: int | None = None,
    init: Any = None,
    seed: int | None = None,
    max_seconds: float | None = None,
    progress: Any = False,
) -> EigenResult:
    """Deflated power iteration; stops when ``||A v - theta v|| <= tol * |theta|``.

    ``which="magnitude"`` is the plain method. ``"largest"``/``"smallest"`` first estimate
    the largest-magnitude eigenvalue ``mu`` and, if it is at the wrong end of the spectrum,
    iterate on ``A - mu I`` instead. ``max_matvecs`` (default 1000) is per eigenpair;
    ``max_seconds`` is for the whole call: when it ends, the pairs found so far (fewer than
    ``k`` if need be) are returned with ``converged=False``.
    """
    op = as_operator(op)
    n = op.shape[0]
    k = check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= the operator dimension n={n}, got {k}")
    which = check_choice("which", which, _WHICH)
    tol = _default_tol(op.dtype) if tol is None else check_positive("tol", tol)
    budget = 1000 if max_matvecs is None else check_positive_int("max_matvecs", max_matvecs)
    t0 = time.perf_counter()
    shift, used = 0.0, 0
    if which != "magnitude":
        first = power_iteration(op, 1, "magnitude", tol=max(tol, 1e-3), max_matvecs=budget,
                                init=init, seed=seed, max_seconds=max_seconds)
        used += first.n_matvecs
        mu = first.value
        if (which == "largest" and mu < 0) or (which == "smallest" and mu > 0):
            shift = mu
    found: list[torch.Tensor] = []
    values, residuals, converged = [], [], True
    if max_seconds is not None and which != "magnitude":  # what the first estimate left
        max_seconds = max(max_seconds - (time.perf_counter() - t0), 1e-9)
    meter = Meter(f"eigenvalues (power, k={k})", None, max_seconds=max_seconds,
                  progress=progress, ranks=getattr(op, "ranks", None))
    for i in range(k):
        if i > 0 and meter.exhausted:
            converged = False
            break
        v = _start(n, 1, init if i == 0 else None, op.dtype, op.device,
                   (0 if seed is None else seed) + i)
        theta, res = 0.0, float("inf")
        for _ in range(budget):
            if found:
                v, _ = _orthogonalize(v, torch.stack(found, dim=1))
                v = v / v.norm()
            w = op.matvec(v) - shift * v
            used += 1
            meter.update(1)
            if found:
                w, _ = _orthogonalize(w, torch.stack(found, dim=1))
            theta = float(v @ w)
            res = float((w - theta * v).norm())
            if res <= tol * max(abs(theta), torch.finfo(op.dtype).tiny):
                break
            if meter.exhausted:
                converged = False
                break
            v = w / w.norm()
        else:
            converged = False
        found.append(v)
        values.append(theta + shift)
        residuals.append(res)
    meter.close()
    vals = torch.tensor(values, dtype=op.dtype, device=op.device)
    order = _select(vals, which)
    vectors = torch.stack(found, dim=1)[:, order]
    res_t = torch.tensor(residuals, dtype=op.dtype, device=op.device)[order]
    return EigenResult(vals[order], vectors, res_t, used, converged, which, "power",
                       "random" if init is None else "given")


def _model_args(op_or_model: Any, args: tuple, names: tuple[str, ...], given: dict) -> dict:
    """Map ``top_eigenvalues``' positional arguments to names: ``(model, loss_fn, data, k,
    which)`` for a model, ``(op, k, which)`` for an operator or tensor."""
    is_model = isinstance(op_or_model, nn.Module)
    order = ("loss_fn", "data", "k", "which") if is_model else ("k", "which")
    if is_model and args and isinstance(args[0], int) and not isinstance(args[0], bool):
        raise TypeError("top_eigenvalues(model, loss_fn, data, k, ...) takes the model's "
                        f"loss_fn and data positionally before k, got k={args[0]!r} second")
    if len(args) > len(order):
        form = "model, loss_fn, data, k, which" if is_model else "op, k, which"
        raise TypeError(f"top_eigenvalues({form}) takes at most {len(order) + 1} positional "
                        f"arguments, got {len(args) + 1}")
    out = dict(given)
    for name, value in zip(order, args):
        if name in names:
            raise TypeError(f"top_eigenvalues got {name} both positionally and by keyword")
        out[name] = value
    return out


def top_eigenvalues(
    op_or_model: Any,
    *args: Any,
    k: int = 1,
    which: str = "largest",
    tol: float | None = None,
    method: str = "lanczos",
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    progress: Any = True,
    krylov_dim: int | None = None,
    block_size: int = 1,
    init: Any = None,
    seed: int | None = None,
    loss_fn: Any = None,
    data: Any = None,
    params: Any = None,
    eval_mode: bool = True,
    distributed: Any = False,
    stop: str = "residual",
) -> EigenResult:
    """The ``k`` extreme eigenvalues of a Hessian (or any symmetric operator).

    Called as ``top_eigenvalues(model, loss_fn, data, k=1, which="largest", ...)``, like every
    instrument, or ``top_eigenvalues(op, k=1, which="largest", ...)`` for an operator or a
    square tensor.

    Args:
        op_or_model: an operator, a square tensor, or an ``nn.Module`` (then ``loss_fn`` and
            ``data`` follow, positionally or by keyword, and the operator is
            ``hessian_operator(model, loss_fn, data, params, eval_mode=eval_mode)``).
        k: number of eigenpairs.
        which: ``"largest"`` (algebraic, the default), ``"smallest"`` or ``"magnitude"``.
        tol: relative residual tolerance ``||H v - lambda v|| <= tol * ||H||``, or, with
            ``stop="value"``, relative tolerance on the eigenvalue error bound.
        method: ``"lanczos"`` (default) or ``"power"``.
        max_matvecs, max_seconds: budgets; when one ends first, the current estimates are
            returned with ``converged=False``.
        progress: a progress bar on stderr when it is a terminal (``False``: never).
        block_size: ``b > 1`` runs block Lanczos (:func:`~flatlab.curvature.block_lanczos`),
            which resolves eigenvalues of multiplicity up to ``b`` without a restart.
        krylov_dim, seed: see :func:`lanczos` / :func:`power_iteration`.
        init: the start: by default, for the top of the spectrum, Lanczos starts from the
            loss gradient mixed with a random vector (see :func:`lanczos`; ``"random"``
            turns that off); or a warm start: a vector ``(n,)``, vectors ``(n, m)`` or a
            previous :class:`EigenResult`.
        distributed: ``True`` or a process group: every rank passes its own shard of the
            data and gets the eigenvalues of the full-data Hessian (see
            :func:`~flatlab.curvature.hessian_operator`); only for a model.
        stop: ``"residual"`` (default) or ``"value"``: what ``tol`` bounds (see
            :func:`lanczos`); ``"value"`` only with ``method="lanczos"`` and ``block_size=1``.

    Raises:
        TypeError: the old ``top_eigenvalues(model, k, loss_fn=..., data=...)`` positional
            order, or an argument given twice.
        ValueError: ``k`` larger than the dimension, a bad ``which``/``method``, or the
            errors of :func:`~flatlab.curvature.hessian_operator`.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
        >>> top_eigenvalues(A, 2).values.tolist()
        [3.0, 1.0]
    """
    given = {"k": k, "which": which, "loss_fn": loss_fn, "data": data}
    defaults = {"k": 1, "which": "largest", "loss_fn": None, "data": None}
    named = tuple(n for n, v in given.items() if v is not defaults[n] and v != defaults[n])
    a = _model_args(op_or_model, args, named, given)
    k, which = a["k"], a["which"]
    method = check_choice("method", method, ("lanczos", "power"))
    block_size = check_positive_int("block_size", block_size)
    stop = check_choice("stop", stop, _STOPS)
    if stop == "value" and (method != "lanczos" or block_size > 1):
        raise ValueError(f"stop='value' needs method='lanczos' and block_size=1, got "
                         f"method={method!r}, block_size={block_size}")
    op = as_operator(op_or_model, loss_fn=a["loss_fn"], data=a["data"], params=params,
                     eval_mode=eval_mode, distributed=distributed)
    budget = {"max_matvecs": max_matvecs, "max_seconds": max_seconds, "progress": progress}
    if method == "power":
        return power_iteration(op, k, which, tol=tol, init=init, seed=seed, **budget)
    if block_size > 1:
        return block_lanczos(op, k, which, block_size=block_size, tol=tol, init=init,
                             seed=seed, krylov_dim=krylov_dim, **budget)
    return lanczos(op, k, which, tol=tol, krylov_dim=krylov_dim, init=init, seed=seed,
                   stop=stop, **budget)
