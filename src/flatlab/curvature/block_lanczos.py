"""Block Lanczos with full reorthogonalization and thick restarts (repeated eigenvalues).

A single start vector ``q_1`` sees only its own projection onto an eigenspace: if
``lambda_1`` has multiplicity ``r > 1``, the Krylov space of ``q_1`` holds one vector of that
eigenspace, and plain Lanczos reports ``lambda_1`` once until a restart or rounding error
brings in another direction. Block Lanczos (Golub & Underwood 1977; Cullum & Donath 1974)
starts from ``b`` orthonormal vectors ``Q_1`` (shape ``(n, b)``) and builds the block Krylov
space ``span{Q_1, A Q_1, A^2 Q_1, ...}``, which holds ``min(r, b)`` independent vectors of every
eigenspace, so multiplicities up to ``b`` are resolved without a restart:

    W = A Q_j                          (b products, one ``matmat``),
    H = Q^T W,  W <- W - Q H           (twice: full reorthogonalization against every block),
    W = Q_{j+1} B_j                    (thin QR),

so ``A Q = Q T + Q_{j+1} B_j E_j^T`` with ``T = Q^T A Q`` (block tridiagonal in exact
arithmetic; kept dense here). A Ritz pair ``(theta_i, Q s_i)`` of ``T`` has residual
``||A y_i - theta_i y_i|| = ||B_j s_i[last block]||``, without another product. Convergence,
tolerance and the thick restart follow :func:`flatlab.curvature.eigen.lanczos` (Wu & Simon
2000 in block form: the kept Ritz vectors ``Y`` satisfy ``A Y = Y Theta + Q_{j+1} B_j S_last``,
so the restarted ``T`` is ``[[Theta, C^T], [C, .]]`` with ``C = B_j S_last``). A rank-deficient
``B_j`` (an invariant subspace) is continued with fresh random directions.

Shapes: ``values (k,)``, ``vectors (n, k)``, ``residuals (k,)``.
"""

from __future__ import annotations

from typing import Any

import torch

from flatlab._checks import check_choice, check_positive, check_positive_int
from flatlab.curvature._krylov import (
    _WHICH,
    EigenResult,
    _default_tol,
    _select,
    _start,
    _work_dtype,
)
from flatlab.curvature._progress import Meter
from flatlab.curvature.hvp import as_operator


def _orth_block(W: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block classical Gram-Schmidt, twice: returns ``(W - Q H, H)`` with ``H = Q^T W``."""
    H = Q.T @ W
    W = W - Q @ H
    H2 = Q.T @ W
    return W - Q @ H2, H + H2


def _next_block(W, Q, scale, gen, eps):
    """Thin QR ``W = Qn Bn``; directions with a vanishing ``Bn`` row are replaced by random
    vectors orthogonal to ``Q`` (their rows of ``Bn`` set to 0)."""
    Qn, Bn = torch.linalg.qr(W)
    dead = Bn.diagonal().abs() <= 10 * eps * max(scale, 1.0)
    for i in torch.nonzero(dead).flatten().tolist():
        r = torch.randn(Q.shape[0], generator=gen, dtype=torch.float64).to(Q)
        r, _ = _orth_block(r[:, None], torch.cat([Q, Qn[:, :i], Qn[:, i + 1 :]], dim=1))
        Qn[:, i] = r[:, 0] / r.norm()
        Bn[i] = 0
    return Qn, Bn


def block_lanczos(
    op: Any,
    k: int = 1,
    which: str = "largest",
    *,
    block_size: int = 2,
    tol: float | None = None,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    krylov_dim: int | None = None,
    init: Any = None,
    seed: int | None = None,
    progress: Any = False,
) -> EigenResult:
    """Thick-restart block Lanczos (see module docstring).

    Args:
        op: a :class:`~flatlab.curvature.operator.LinearOperator` or a square tensor.
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"largest"``, ``"smallest"`` (algebraic) or ``"magnitude"``.
        block_size: ``b``, the largest multiplicity resolved without a restart.
        tol: relative residual tolerance (as :func:`~flatlab.curvature.eigen.lanczos`).
        max_matvecs: product budget (default ``max(300, 40 k)``); max_seconds: time budget.
            When one ends, the current Ritz pairs are returned with ``converged=False``.
        krylov_dim: basis size before a restart (default ``max(2k + 10, 20) + b``).
        init: start vector(s) ``(n,)`` / ``(n, m)`` or an :class:`EigenResult`: the first
            column of the start block; the rest is random.
        seed: seed of the random start block.
        progress: a progress bar on stderr when it is a terminal.

    Raises:
        ValueError: ``k > n``, ``krylov_dim < k + b``, or a bad ``which``.
    """
    op = as_operator(op)
    n = op.shape[0]
    k = check_positive_int("k", k)
    if k > n:
        raise ValueError(f"k must be <= the operator dimension n={n}, got {k}")
    which = check_choice("which", which, _WHICH)
    b = min(check_positive_int("block_size", block_size), n)
    tol = _default_tol(op.dtype) if tol is None else check_positive("tol", tol)
    max_matvecs = max(300, 40 * k) if max_matvecs is None else check_positive_int(
        "max_matvecs", max_matvecs)
    m = min(n, max(2 * k + 10, 20) + b if krylov_dim is None else check_positive_int(
        "krylov_dim", krylov_dim))
    if m < k + b and m < n:
        raise ValueError(f"krylov_dim must be >= k + block_size = {k + b}, got {m}")
    dtype, device = _work_dtype(op.dtype), op.device
    eps = torch.finfo(op.dtype).eps
    gen = torch.Generator().manual_seed(0 if seed is None else int(seed))

    start = torch.randn(n, b, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    if init is not None:
        start[:, 0] = _start(n, k, init, dtype, device, seed)
    Q = torch.empty(n, m, dtype=dtype, device=device)
    Q[:, :b], _ = torch.linalg.qr(start)
    T = torch.zeros(m, m, dtype=torch.float64)
    j, bj, used = 0, b, 0  # the current block is Q[:, j : j + bj]
    meter = Meter(f"eigenvalues (block lanczos, k={k}, b={b})", None, max_matvecs=max_matvecs,
                  max_seconds=max_seconds, progress=progress, ranks=getattr(op, "ranks", None))
    with meter:
        while True:
            W = op.matmat(Q[:, j : j + bj]).to(dtype)
            used += bj
            meter.update(bj)
            p = j + bj
            W, H = _orth_block(W, Q[:, :p])
            Hd = H.to(torch.float64).cpu()
            T[:p, j:p] = Hd
            T[j:p, :p] = Hd.T
            theta, svec = torch.linalg.eigh((T[:p, :p] + T[:p, :p].T) / 2)
            order = _select(theta, which)
            scale = max(float(theta.abs().max()), torch.finfo(dtype).tiny)
            exhausted = p >= n
            if not exhausted:
                Qn, Bn = _next_block(W, Q[:, :p], scale, gen, eps)
                Bd = Bn.to(torch.float64).cpu()
                resid = (Bd @ svec[j:p]).norm(dim=0)
            else:
                resid = torch.zeros(p, dtype=torch.float64)
            want = order[: min(k, p)]
            done = p >= k and bool((resid[want] <= tol * scale).all())
            if done or exhausted:
                break
            nb = min(b, n - p)
            if meter.allowed(nb) < nb:
                break
            Qn, Bd = Qn[:, :nb], Bd[:nb]
            if p + nb <= m:
                Q[:, p : p + nb] = Qn
                T[p : p + nb, j:p] = Bd
                T[j:p, p : p + nb] = Bd.T
                j, bj = p, nb
                continue
            # thick restart: keep the wanted Ritz vectors and as many next-best ones
            keep = order[: min(m - nb, max(k, (m + k) // 2))]
            s = svec[:, keep]
            q = len(keep)
            Q[:, :q] = Q[:, :p] @ s.to(dtype=dtype, device=device)
            Q[:, q : q + nb] = Qn
            C = Bd @ s[j:p]  # (nb, q): the coupling of the kept vectors to the new block
            T.zero_()
            T[:q, :q] = torch.diag(theta[keep])
            T[q : q + nb, :q] = C
            T[:q, q : q + nb] = C.T
            j, bj = q, nb
    s = svec[:, want].to(dtype=dtype, device=device)
    vectors = Q[:, :p] @ s
    values = theta[want].to(dtype=dtype, device=device)
    residuals = resid[want].to(dtype=dtype, device=device)
    return EigenResult(values, vectors, residuals, used, done or exhausted, which,
                       "block_lanczos", "random" if init is None else "given")
