"""Stochastic trace estimation: Hutchinson and Hutch++.

Hutchinson (Hutchinson 1989): for probes ``z`` with ``E[z z^T] = I`` (Rademacher entries),

    tr(A) = E[z^T A z],   estimate  t = (1/K) sum_k z_k^T A z_k,

unbiased, with per-probe variance ``2 (||A||_F^2 - sum_i A_ii^2)`` for Rademacher probes; the
reported standard error is the sample standard deviation of ``z_k^T A z_k`` over ``sqrt(K)``.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, arXiv:2010.09649): spend a third of the ``m``
products on a sketch ``Q = orth(A S)`` (``S`` of shape ``(n, m/3)``), take the trace of the
captured part exactly and Hutchinson on the deflated rest:

    t = tr(Q^T A Q) + (3/m) tr(G^T (I - QQ^T) A (I - QQ^T) G),

which needs ``O(1/eps)`` products for relative error ``eps`` on PSD matrices (against
``O(1/eps^2)``); on indefinite Hessians it stays unbiased and is at worst like Hutchinson.
Its standard error is that of the Hutchinson part.

Probes are processed in blocks through ``op.matmat`` (one batched pass of ``torch.func.vmap``
for a Hessian operator). Shapes: probes ``(n, K)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flatlab._checks import check_choice, check_positive_int
from flatlab.curvature.eigen import _work_dtype
from flatlab.curvature.operator import as_operator


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        value: the estimate of ``tr(A)``.
        stderr: its standard error (0 when the estimate is exact, e.g. ``probes >= 3 n``
            for Hutch++).
        n_matvecs: operator products used.
        method: ``"hutchinson"`` or ``"hutch++"``.
        samples: the per-probe values ``z^T A z`` of the Hutchinson part, shape ``(K,)``.
    """

    value: float
    stderr: float
    n_matvecs: int
    method: str
    samples: torch.Tensor


def _matmat(op: Any, V: torch.Tensor, block: int) -> torch.Tensor:
    """``A V`` in blocks of columns, returned in V's dtype (float32 at least)."""
    if V.shape[1] == 0:
        return V.clone()
    mm = getattr(op, "matmat", None)
    cols = []
    for s in range(0, V.shape[1], block):
        chunk = V[:, s : s + block]
        if mm is not None:
            cols.append(mm(chunk))
        else:
            cols.append(torch.stack([op.matvec(c) for c in chunk.T], dim=1))
    return torch.cat(cols, dim=1).to(V.dtype)


def _rademacher(n: int, k: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    """Rademacher probes in float32 or float64 (half-precision operators cast them)."""
    dtype = _work_dtype(dtype)
    z = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int8).to(dtype) * 2 - 1
    return z.to(device)


def hutchinson(op: Any, probes: int = 100, *, seed: int = 0, block: int = 16) -> TraceResult:
    """Hutchinson's estimator with ``probes`` Rademacher probes (see module docstring)."""
    op = as_operator(op)
    probes = check_positive_int("probes", probes)
    gen = torch.Generator().manual_seed(int(seed))
    Z = _rademacher(op.shape[0], probes, gen, op.dtype, op.device)
    samples = (Z * _matmat(op, Z, block)).sum(dim=0)
    stderr = float(samples.std() / probes**0.5) if probes > 1 else float("inf")
    return TraceResult(float(samples.mean()), stderr, probes, "hutchinson", samples)


def hutchpp(op: Any, probes: int = 99, *, seed: int = 0, block: int = 16) -> TraceResult:
    """Hutch++ with a budget of ``probes >= 3`` products (see module docstring)."""
    op = as_operator(op)
    probes = check_positive_int("probes", probes)
    if probes < 3:
        raise ValueError(f"probes must be >= 3 for hutch++, got {probes}")
    n = op.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    r = min(probes // 3, n)
    g = probes - 2 * r  # the remainder goes to the Hutchinson part
    S = _rademacher(n, r, gen, op.dtype, op.device)
    Q, _ = torch.linalg.qr(_matmat(op, S, block))
    low_rank = float(torch.trace(Q.T @ _matmat(op, Q, block)))
    G = _rademacher(n, g, gen, op.dtype, op.device)
    G = G - Q @ (Q.T @ G)
    AG = _matmat(op, G, block)
    AG = AG - Q @ (Q.T @ AG)
    samples = (G * AG).sum(dim=0)
    if r == n:  # Q spans everything: the first term is exact
        return TraceResult(low_rank, 0.0, 2 * r + g, "hutch++", samples)
    stderr = float(samples.std() / g**0.5) if g > 1 else float("inf")
    return TraceResult(low_rank + float(samples.mean()), stderr, 2 * r + g, "hutch++", samples)


def hessian_trace(
    op_or_model: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    probes: int = 99,
    method: str = "hutch++",
    seed: int = 0,
    block: int = 16,
    params: Any = None,
    eval_mode: bool = True,
) -> TraceResult:
    """Estimate ``tr(H)`` with ``probes`` Hessian-vector products.

    Args:
        op_or_model: an operator, a square tensor, or a model (with ``loss_fn`` and ``data``,
            positional or by keyword).
        probes: number of products (the total budget for Hutch++).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        seed: seed of the probes; block: probes per batched product.

    Raises:
        ValueError: a bad ``method``, ``probes < 1`` (``< 3`` for Hutch++).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> round(hessian_trace(A, probes=15).value, 6)
        15.0
    """
    method = check_choice("method", method, ("hutch++", "hutchinson"))
    op = as_operator(op_or_model, loss_fn=loss_fn, data=data, params=params, eval_mode=eval_mode)
    if method == "hutchinson":
        return hutchinson(op, probes, seed=seed, block=block)
    return hutchpp(op, probes, seed=seed, block=block)
