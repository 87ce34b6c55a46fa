"""Stochastic trace estimation: XTrace, XNysTrace, Hutch++ and Hutchinson.

Every estimator returns the estimate with an error estimate (``stderr``), the products spent
and whether it ran to its planned budget (``converged``).

Hutchinson (Hutchinson 1989): for probes ``z`` with ``E[z z^T] = I`` (Rademacher entries),
``t = (1/K) sum_k z_k^T A z_k``, unbiased; ``stderr`` is the sample standard deviation of
``z_k^T A z_k`` over ``sqrt(K)``. This is PyHessian's estimator.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, arXiv:2010.09649): a third of the ``m``
products on a sketch ``Q = orth(A S)``, the trace of the captured part exactly, Hutchinson on
the deflated rest: ``t = tr(Q^T A Q) + (3/m) tr(G^T (I - QQ^T) A (I - QQ^T) G)``; ``stderr``
is that of the Hutchinson part.

XTrace (Epperly, Tropp & Webber 2024, SIAM J. Matrix Anal. Appl. 45(1), arXiv:2301.07825)
uses every probe both in the sketch and in the Hutchinson part (exchangeability). With
``s = m / 2`` probes ``Omega = [w_1 .. w_s]`` (Gaussian, each column scaled to norm
``sqrt(n)``), ``Y = A Omega = Q R`` (``Q`` of shape ``(n, s)``) and ``Z = A Q`` (``m`` products
in all), the leave-one-out basis ``Q_i = orth(Y without column i)`` spans
``Q (I - s_i s_i^T)`` with ``s_i = R^{-T} e_i / ||R^{-T} e_i||``, and

    t_i = tr(Q_i^T A Q_i) + (n - s + 1) x_i^T A x_i / ||x_i||^2,   x_i = (I - Q_i Q_i^T) w_i,
    t = (1/s) sum_i t_i,   stderr = std(t_1 .. t_s) / sqrt(s).

``w_i`` is independent of ``Q_i``, so each ``t_i`` is unbiased; ``x_i / ||x_i||`` is uniform on
the unit sphere of the ``(n - s + 1)``-dimensional complement, hence the factor (the paper's
improved estimator). With ``H = Q^T Z``, ``W = Q^T Omega``, ``T = Z^T Omega`` and
``c_i = s_i^T w'_i`` (``w'_i = W e_i``) all terms are ``s x s`` algebra:

    tr(Q_i^T A Q_i) = tr H - s_i^T H s_i,   ||x_i||^2 = ||w_i||^2 - ||w'_i||^2 + c_i^2,
    x_i^T A x_i = w'^T H w' - t_i^T w' + c (t_i^T s_i + s_i^T r_i - 2 w'^T H s_i) + c^2 s_i^T H s_i

(``t_i = T e_i``, ``r_i = R e_i``; ``w_i^T A w_i = w'^T r_i`` cancels).

XNysTrace (same paper), for PSD ``A`` (a GGN; not an indefinite Hessian): the Nyström
approximation ``A<Omega> = Y (Omega^T Y)^{-1} Y^T`` interpolates ``A`` on ``Omega``, needs only
the ``s = m`` products ``Y``, and its leave-one-out version is a rank-one downdate. With
``G = Omega^T Y = L L^T`` (Cholesky), ``Y = Q R``, ``B = R L^{-T}``, ``d = diag(G^{-1})``:

    tr A<Omega_-i> = ||B||_F^2 - ||R G^{-1} e_i||^2 / d_i,
    w_i^T (A - A<Omega_-i>) w_i = 1 / d_i,
    t_i = tr A<Omega_-i> + (n - s + 1) ((Omega^T Omega)^{-1})_ii / d_i,

the last factor again rescaling to the complement of ``Omega_-i`` (``A - A<Omega_-i>``
vanishes on ``Omega_-i``). A tiny shift ``nu`` (``A + nu I``, subtracted afterwards) keeps
``G`` positive definite in floating point.

Gauss-Newton (:func:`gauss_newton_trace`, a model only): ``tr H = tr G + tr R`` with
``tr G`` computed exactly from per-example gradients and the tensors the outputs are not
affine in taken exactly when their block fits the products, or else by Hutchinson on their
Hessian or residual block (``R = H - G``, one product each, :func:`residual_operator`),
probed whole or one tensor at a time, whichever a pilot finds less variable per product; for
piecewise-linear networks ``tr R = 0`` and the trace is exact
(:mod:`flatlab.curvature.gauss_newton`).

Probes are applied in blocks through ``op.matmat``. When ``max_seconds`` ends a sketch early,
the estimate falls back to Hutchinson on the products already done (``converged=False``).
Shapes: probes ``(n, s)``; small matrices ``(s, s)`` in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flatlab._batches import _is_pair
from flatlab._checks import check_choice, check_positive_int
from flatlab._ranks import ranks_of
from flatlab.curvature._krylov import _work_dtype
from flatlab.curvature._progress import Meter
from flatlab.curvature.gauss_newton import NotApplicable, Plan, ggn_trace, plan
from flatlab.curvature.hvp import (
    as_operator,
    hessian_operator,
    residual_operator,
)

METHODS = ("auto", "xtrace", "xnystrace", "hutch++", "hutchinson", "gauss_newton")
# the fewest probes each estimator needs (gauss_newton: 8 residual products, its pilot's 4
# and 4 more)
MINIMUM_PROBES = {"auto": 4, "xtrace": 4, "xnystrace": 2, "hutch++": 3, "hutchinson": 1,
                  "gauss_newton": 4}


@dataclass(frozen=True)
class TraceResult:
    """A trace estimate.

    Attributes:
        value: the estimate of ``tr(A)`` (NaN if a budget ended before any product).
        stderr: its estimated standard error (0 when exact, ``inf`` when unknown).
        n_matvecs: operator products used (``"gauss_newton"``: its per-example gradient
            passes, plus the Hessian and residual products on the residual block).
        method: ``"xtrace"``, ``"xnystrace"``, ``"hutch++"``, ``"hutchinson"``,
            ``"gauss_newton"`` or ``"exact"`` (``probes >= n``: ``sum_i e_i^T A e_i``).
        samples: the per-probe values averaged into ``value`` (Hutchinson terms, or the
            exchangeable estimates ``t_i``), shape ``(K,)``; for ``"gauss_newton"`` the
            residual block's probe values ``z^T A z``, averaged per tensor when its probes
            were spread over the tensors (:func:`_residual_block`).
        converged: the planned budget was spent (``False``: a budget cut it short).
    """

    value: float
    stderr: float
    n_matvecs: int
    method: str
    samples: torch.Tensor
    converged: bool = True


def _apply(op: Any, V: torch.Tensor, block: int, meter: Meter) -> torch.Tensor:
    """``A V`` in blocks of columns while the budget lasts; returns the columns done."""
    cols, done = [], 0
    mm = getattr(op, "matmat", None)
    while done < V.shape[1]:
        b = meter.allowed(min(block, V.shape[1] - done))
        if b == 0:
            break
        chunk = V[:, done : done + b]
        out = mm(chunk) if mm is not None else torch.stack([op.matvec(c) for c in chunk.T], 1)
        cols.append(out.to(V.dtype))
        done += b
        meter.update(b)
    return torch.cat(cols, dim=1) if cols else V[:, :0].clone()


def _rademacher(n: int, k: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    """Rademacher probes in float32 or float64 (half-precision operators cast them)."""
    z = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int8).to(_work_dtype(dtype))
    return (z * 2 - 1).to(device)


def _sphere(n: int, k: int, gen: torch.Generator, dtype, device) -> torch.Tensor:
    """Gaussian directions scaled to norm ``sqrt(n)`` (so ``E[w w^T] = I``)."""
    g = torch.randn(n, k, generator=gen, dtype=torch.float64)
    g = g * (n**0.5 / g.norm(dim=0))
    return g.to(dtype=_work_dtype(dtype), device=device)


def _mean_se(samples: torch.Tensor) -> tuple[float, float]:
    k = samples.numel()
    if k == 0:
        return float("nan"), float("inf")
    return float(samples.mean()), float(samples.std() / k**0.5) if k > 1 else float("inf")


def _result(samples, used, method, converged) -> TraceResult:
    value, stderr = _mean_se(samples.to(torch.float64).cpu())
    return TraceResult(value, stderr, used, method, samples, converged)


def _fallback(Z: torch.Tensor, AZ: torch.Tensor, used: int) -> TraceResult:
    """Hutchinson on the probes whose products are done (a budget cut the sketch short)."""
    k = AZ.shape[1]
    return _result((Z[:, :k] * AZ).sum(dim=0), used, "hutchinson", False)


def _exact(op: Any, block: int, meter: Meter) -> TraceResult:
    n = op.shape[0]
    eye = torch.eye(n, dtype=_work_dtype(op.dtype), device=op.device)
    AE = _apply(op, eye, block, meter)
    if AE.shape[1] < n:  # cut short: the diagonal seen so far says little; sample instead
        return TraceResult(float("nan"), float("inf"), AE.shape[1], "exact", AE.diagonal(),
                           False)
    return TraceResult(float(AE.diagonal().sum()), 0.0, n, "exact", AE.diagonal(), True)


def _prepare(op: Any, probes: int, seed: int, name: str, meter: Meter | None,
             minimum: int = 1) -> tuple[Any, int, Meter, torch.Generator]:
    """What every estimator starts with: the operator, the checked product budget, a meter
    and the seeded probe generator."""
    op = as_operator(op)
    probes = check_positive_int("probes", probes)
    if probes < minimum:
        raise ValueError(f"probes must be >= {minimum} for {name}, got {probes}")
    meter = meter or Meter(f"trace ({name})", probes, progress=False,
                           ranks=getattr(op, "ranks", None))
    return op, probes, meter, torch.Generator().manual_seed(int(seed))


def _range_sketch(op: Any, Om: torch.Tensor, block: int, meter: Meter) -> Any:
    """``(Y, Q, R, Z)`` with ``Y = A Om``, ``Y = Q R`` and ``Z = A Q``: the two sketches of
    Hutch++ and XTrace (``Om`` is ``(n, s)``). When a budget ends before both are done, the
    Hutchinson estimate from the products so far (a :class:`TraceResult`) instead."""
    s = Om.shape[1]
    Y = _apply(op, Om, block, meter)
    if Y.shape[1] < s:
        return _fallback(Om, Y, Y.shape[1])
    Q, R = torch.linalg.qr(Y)
    Z = _apply(op, Q, block, meter)
    if Z.shape[1] < s:
        return _fallback(Om, Y, s + Z.shape[1])
    return Y, Q, R, Z


def hutchinson(op: Any, probes: int = 100, *, seed: int = 0, block: int = 16,
               meter: Meter | None = None) -> TraceResult:
    """Hutchinson's estimator with ``probes`` Rademacher probes (see module docstring)."""
    op, probes, meter, gen = _prepare(op, probes, seed, "hutchinson", meter)
    Z = _rademacher(op.shape[0], probes, gen, op.dtype, op.device)
    AZ = _apply(op, Z, block, meter)
    samples = (Z[:, : AZ.shape[1]] * AZ).sum(dim=0)
    return _result(samples, AZ.shape[1], "hutchinson", AZ.shape[1] == probes)


def hutchpp(op: Any, probes: int = 99, *, seed: int = 0, block: int = 16,
            meter: Meter | None = None) -> TraceResult:
    """Hutch++ with a budget of ``probes >= 3`` products (see module docstring)."""
    op, probes, meter, gen = _prepare(op, probes, seed, "hutch++", meter,
                                      minimum=MINIMUM_PROBES["hutch++"])
    n = op.shape[0]
    r = min(probes // 3, n)
    g = probes - 2 * r  # the remainder goes to the Hutchinson part
    S = _rademacher(n, r, gen, op.dtype, op.device)
    sketch = _range_sketch(op, S, block, meter)
    if isinstance(sketch, TraceResult):
        return sketch
    _, Q, _, AQ = sketch
    low_rank = float(torch.trace(Q.T @ AQ))
    G = _rademacher(n, g, gen, op.dtype, op.device)
    G = G - Q @ (Q.T @ G)
    AG = _apply(op, G, block, meter)
    AG = AG - Q @ (Q.T @ AG)
    samples = (G[:, : AG.shape[1]] * AG).sum(dim=0)
    used = 2 * r + AG.shape[1]
    if r == n:  # Q spans everything: the first term is exact
        return TraceResult(low_rank, 0.0, used, "hutch++", samples, True)
    mean, stderr = _mean_se(samples.to(torch.float64).cpu())
    if samples.numel() == 0:
        mean = 0.0
    return TraceResult(low_rank + mean, stderr, used, "hutch++", samples, AG.shape[1] == g)


def _ddot(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Column-wise inner products ``diag(A^T B)``."""
    return (A * B).sum(dim=0)


def xtrace_estimates(Om: torch.Tensor, Y: torch.Tensor, Q: torch.Tensor, R: torch.Tensor,
                     Z: torch.Tensor) -> torch.Tensor:
    """The exchangeable XTrace estimates ``t_i`` (module docstring), shape ``(s,)``.

    Args:
        Om: probes ``(n, s)``; Y: ``A Om``; Q, R: ``qr(Y)``; Z: ``A Q``.
    """
    n, s = Om.shape
    f = torch.float64
    W, T, H = (Q.T @ Om).to(f), (Z.T @ Om).to(f), (Q.T @ Z).to(f)
    H = (H + H.T) / 2
    R = R.to(f)
    Sm = torch.linalg.solve_triangular(R.T, torch.eye(s, dtype=f, device=R.device), upper=False)
    Sm = Sm / Sm.norm(dim=0)  # column i: s_i, orthogonal to every column of R but the i-th
    c = _ddot(Sm, W)
    HS = H @ Sm
    quad = (_ddot(W, H @ W) - _ddot(T, W)
            + c * (_ddot(T, Sm) + _ddot(Sm, R) - 2 * _ddot(W, HS)) + c**2 * _ddot(Sm, HS))
    norm2 = _ddot(Om, Om).to(f) - _ddot(W, W) + c**2
    return torch.trace(H) - _ddot(Sm, HS) + (n - s + 1) * quad / norm2


def xtrace(op: Any, probes: int = 100, *, seed: int = 0, block: int = 16,
           meter: Meter | None = None) -> TraceResult:
    """XTrace with ``probes`` products (``probes // 2`` probes; see module docstring).

    Raises:
        ValueError: ``probes < 4``.
    """
    op, probes, meter, gen = _prepare(op, probes, seed, "xtrace", meter,
                                      minimum=MINIMUM_PROBES["xtrace"])
    n = op.shape[0]
    if probes >= n:
        return _exact(op, block, meter)
    s = probes // 2
    Om = _sphere(n, s, gen, op.dtype, op.device)
    sketch = _range_sketch(op, Om, block, meter)
    if isinstance(sketch, TraceResult):
        return sketch
    Y, Q, R, Z = sketch
    return _result(xtrace_estimates(Om, Y, Q, R, Z), 2 * s, "xtrace", True)


def xnystrace_estimates(Om: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """The exchangeable XNysTrace estimates ``t_i`` for PSD ``A`` (``Y = A Om``), ``(s,)``."""
    n, s = Om.shape
    f = torch.float64
    eps = torch.finfo(Y.dtype).eps
    nu = eps * float(Y.norm()) / n**0.5
    for _ in range(8):  # grow the shift until Omega^T (Y + nu Omega) is positive definite
        Yn = Y + nu * Om
        G = (Om.T @ Yn).to(f)
        L, info = torch.linalg.cholesky_ex((G + G.T) / 2)
        if int(info) == 0:
            break
        nu = max(10 * nu, eps)
    else:
        raise ValueError("xnystrace needs a positive semi-definite operator (Omega^T A Omega "
                         "is not positive definite); use method='xtrace'")
    _, R = torch.linalg.qr(Yn)
    R = R.to(f)
    B = torch.linalg.solve_triangular(L, R.T, upper=False).T  # R L^{-T}
    eye = torch.eye(s, dtype=f, device=L.device)
    Ginv = torch.cholesky_solve(eye, L)
    d = Ginv.diagonal()
    RG = R @ Ginv
    OtO = (Om.T @ Om).to(f)
    scale = (n - s + 1) * torch.linalg.inv(OtO).diagonal()
    return B.pow(2).sum() - _ddot(RG, RG) / d + scale / d - nu * n


def xnystrace(op: Any, probes: int = 100, *, seed: int = 0, block: int = 16,
              meter: Meter | None = None) -> TraceResult:
    """XNysTrace (PSD operators only) with ``probes`` products (see module docstring).

    Raises:
        ValueError: ``probes < 2``, or an operator that is not PSD on the probes.
    """
    op, probes, meter, gen = _prepare(op, probes, seed, "xnystrace", meter,
                                      minimum=MINIMUM_PROBES["xnystrace"])
    n = op.shape[0]
    if probes >= n:
        return _exact(op, block, meter)
    Om = _sphere(n, probes, gen, op.dtype, op.device)
    Y = _apply(op, Om, block, meter)
    if Y.shape[1] < probes:
        return _fallback(Om, Y, Y.shape[1])
    return _result(xnystrace_estimates(Om, Y), probes, "xnystrace", True)


# Rademacher probes per parameter tensor in the residual's pilot (two: the least from which
# the diagonal's share of a block's Frobenius norm has an unbiased estimate)
PILOT_PROBES = 2


@dataclass(frozen=True)
class _Pilot:
    """What the pilot measured of one operator ``A`` (``H_nn`` or ``R_nn``) on ``m`` groups.

    ``q[g, p] = z_gp^T A z_gp`` (the probe values, ``(m, P)``); ``off2[g]``, an unbiased
    estimate of ``||A_gg||_off^2``; ``cross``, of ``sum_{j != g} ||A_jg||_F^2``.
    """

    q: torch.Tensor
    off2: torch.Tensor
    cross: float

    @property
    def joint(self) -> float:
        """Hutchinson's variance per probe on the whole block, ``2 ||A||_off^2``."""
        return 2 * (float(self.off2.sum()) + self.cross)

    @property
    def split(self) -> float:
        """The variance per probe with the probes spread over the groups in proportion to
        ``||A_gg||_off`` (each probe on one group), ``2 (sum_g ||A_gg||_off)^2``."""
        return 2 * float(self.off2.sqrt().sum()) ** 2


def _pilot(Z: torch.Tensor, AZ: torch.Tensor, groups: list[slice]) -> _Pilot:
    """Estimate :class:`_Pilot` from ``P`` probes per group (``Z``, ``(n, m P)``, column
    ``g P + p`` supported on ``groups[g]``) and their products ``AZ``.

    ``E ||(A z)_j||^2 = ||A_jg||_F^2`` for Rademacher ``z`` on group ``g``, and the diagonal
    ``d = diag(A_gg)`` has ``E[z ⊙ A z] = d``, so for two independent probes
    ``<z_1 ⊙ (A z_1)_g, z_2 ⊙ (A z_2)_g>`` estimates ``||d||^2`` without bias:
    ``||A_gg||_off^2 = ||A_gg||_F^2 - ||d||^2``.
    """
    m = len(groups)
    P = Z.shape[1] // m
    q = (Z * AZ).sum(dim=0).reshape(m, P).to(torch.float64)
    sq = torch.stack([AZ[grp].to(torch.float64).square().sum(dim=0) for grp in groups])
    F2 = sq.reshape(m, m, P).mean(dim=2)  # F2[j, g]: ||A_jg||_F^2
    off2 = torch.empty(m, dtype=torch.float64)
    for g, grp in enumerate(groups):
        cols = slice(g * P, (g + 1) * P)
        dz = (Z[grp, cols] * AZ[grp, cols]).to(torch.float64)  # (n_g, P)
        gram = dz.T @ dz
        pairs = (gram.sum() - gram.diagonal().sum()) / (P * (P - 1))
        off2[g] = (F2[g, g] - pairs).clamp(min=0.0)
    cross = float(F2.sum() - F2.diagonal().sum())
    return _Pilot(q.cpu(), off2.cpu(), cross)


def _allocation(weights: torch.Tensor, have: int, more: int) -> list[int]:
    """Spread ``more`` probes over the groups so that with the ``have`` each already has,
    their counts are as near as integers allow to proportional to ``weights``."""
    m = weights.numel()
    total = float(weights.sum())
    share = weights / total if total > 0 else torch.full((m,), 1.0 / m, dtype=torch.float64)
    want = ((more + have * m) * share - have).clamp(min=0.0)
    want = want * (more / float(want.sum())) if float(want.sum()) > 0 else share * more
    counts = want.floor().long()
    rest = (want - counts).argsort(descending=True)[: more - int(counts.sum())]
    counts[rest] += 1
    return counts.tolist()


def _group_probes(groups: list[slice], counts: list[int], n: int, gen: torch.Generator,
                  dtype, device) -> torch.Tensor:
    """``(n, sum(counts))``: ``counts[g]`` Rademacher probes supported on ``groups[g]``."""
    Z = torch.zeros(n, sum(counts), dtype=_work_dtype(dtype), device=device)
    col = 0
    for grp, k in zip(groups, counts):
        Z[grp, col:col + k] = _rademacher(grp.stop - grp.start, k, gen, dtype, device)
        col += k
    return Z


def _residual_block(h: Any, r: Any, products: int, seed: int, block: int, meter: Meter,
                    sizes: Any = None) -> tuple[str, TraceResult]:
    """``tr H_nn`` or ``tr R_nn`` of the residual block within ``products`` products.

    ``h`` and ``r`` are the Hessian and residual (``H - G``, :func:`residual_operator`)
    operators on the residual's tensors (dimension ``n``; ``sizes``: the tensors' sizes, in
    order; ``None``: one group). If ``n <= products``: ``tr H_nn`` exactly, from ``n`` unit
    columns (``("H", exact)``). Otherwise:

    - **The pilot.** The groups are the tensors when their pilot takes at most half the
      products (``4 m <= products / 2``), else the whole block. :data:`PILOT_PROBES`
      Rademacher probes per group, each supported on its group, take an ``H`` and an ``R``
      product. From them (:func:`_pilot`) it estimates, for ``A = H_nn`` and ``A = R_nn``,
      Hutchinson's variance per product on the whole block, ``2 ||A||_off^2`` (which pays
      for the blocks coupling two tensors), and with the probes spread over the groups,
      ``2 (sum_g ||A_gg||_off)^2`` (which does not). ``||.||_off``: the Frobenius norm off
      the diagonal.
    - **The rest** of the products go to the least of the four: as probes of the whole
      block, combined with the pilot's per-group estimate by inverse-variance weights (from
      the pilot's variances), or as probes of one group at a time, allocated in proportion
      to ``||A_gg||_off`` (:func:`_allocation`), ``tr A = sum_g mean_g``, with the pilot's
      samples kept. At initialisation ``G`` is a small part of ``H``; after training ``R``
      is. In a convolutional network the coupling of two layers can be most of
      ``||A||_off`` (docs/benchmarks.md).

    ``stderr`` comes from the samples (per group, and for the combination its weights). The
    choice uses samples it then averages, a selection effect of the order of the variance
    estimates' error. A budget that ends in the pilot leaves the ``H`` samples done
    (``NaN`` if a group has none, ``stderr`` infinite). Returns ``"H"`` or ``"R"`` and the
    estimate; its ``samples`` are the probe values ``z^T A z``.
    """
    n = h.shape[0]
    if n <= products:
        return "H", _exact(h, block, meter)
    gen = torch.Generator().manual_seed(int(seed))
    bounds = [0]
    for size in (sizes if sizes else [n]):
        bounds.append(bounds[-1] + int(size))
    groups = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    if len(groups) > 1 and 4 * PILOT_PROBES * len(groups) > 2 * products:
        groups = [slice(0, n)]
    m, P = len(groups), PILOT_PROBES
    Z = _group_probes(groups, [P] * m, n, gen, h.dtype, h.device)
    HZ = _apply(h, Z, block, meter)
    RZ = _apply(r, Z[:, : HZ.shape[1]], block, meter)
    used = HZ.shape[1] + RZ.shape[1]
    if RZ.shape[1] < m * P:  # a budget ended the pilot
        q = (Z[:, : HZ.shape[1]] * HZ).sum(dim=0).to(torch.float64).cpu()
        done = [q[g * P:(g + 1) * P] for g in range(m)]
        value = (sum(float(d.mean()) for d in done) if all(d.numel() for d in done)
                 else float("nan"))
        return "H", TraceResult(value, float("inf"), used, "hutchinson", q, False)
    pilots = {"H": _pilot(Z, HZ, groups), "R": _pilot(Z, RZ, groups)}
    options = {(a, how): getattr(pilots[a], how) for a in ("H", "R")
               for how in ("joint", "split")}
    which, how = min(options, key=options.get)  # ties: H before R, joint before split
    op, pilot = (h, pilots["H"]) if which == "H" else (r, pilots["R"])
    more = products - used
    probe = _split_probes if how == "split" else _joint_probes
    return which, probe(op, pilot, groups, more, used, gen, block, meter)


def _split_probes(op: Any, pilot: _Pilot, groups: list[slice], more: int, used: int,
                  gen: torch.Generator, block: int, meter: Meter) -> TraceResult:
    """``more`` probes of one group at a time, allocated in proportion to ``||A_gg||_off``
    beside the pilot's: ``tr A = sum_g mean_g``, ``stderr^2 = sum_g var_g / k_g``."""
    P = pilot.q.shape[1]
    counts = _allocation(pilot.off2.sqrt(), P, more)
    Z = _group_probes(groups, counts, op.shape[0], gen, op.dtype, op.device)
    AZ = _apply(op, Z, block, meter)
    done = AZ.shape[1]  # a budget may end it: each group keeps the probes done
    new = (Z[:, :done] * AZ).sum(dim=0).to(torch.float64).cpu()
    value, var, col, samples = 0.0, 0.0, 0, [pilot.q.flatten()]
    for g, k in enumerate(counts):
        mine = torch.cat([pilot.q[g], new[min(col, done):min(col + k, done)]])
        col += k
        value += float(mine.mean())
        var += float(mine.var()) / mine.numel()
        samples.append(mine[P:])
    return TraceResult(value, var**0.5, used + done, "hutchinson", torch.cat(samples),
                       done == more)


def _joint_probes(op: Any, pilot: _Pilot, groups: list[slice], more: int, used: int,
                  gen: torch.Generator, block: int, meter: Meter) -> TraceResult:
    """``more`` probes of the whole block, combined with the pilot's per-group estimate by
    inverse-variance weights taken from the pilot's variances (smooth, not from the samples
    they weigh)."""
    P = pilot.q.shape[1]
    Z = _rademacher(op.shape[0], more, gen, op.dtype, op.device)
    AZ = _apply(op, Z, block, meter)
    joint = (Z[:, : AZ.shape[1]] * AZ).sum(dim=0).to(torch.float64).cpu()
    k = joint.numel()
    split = float(pilot.q.mean(dim=1).sum())
    split_var = float(pilot.q.var(dim=1).sum()) / P
    samples = torch.cat([pilot.q.flatten(), joint])
    if k == 0:
        return TraceResult(split, split_var**0.5, used, "hutchinson", samples, False)
    v_joint, v_split = pilot.joint / k, 2 * float(pilot.off2.sum()) / P
    w = v_split / (v_split + v_joint) if v_split + v_joint > 0 else k / (k + P)
    value = w * float(joint.mean()) + (1 - w) * split
    j_var = float(joint.var()) / k if k > 1 else float("inf")
    stderr = (w * w * j_var + (1 - w) ** 2 * split_var) ** 0.5
    return TraceResult(value, stderr, used + k, "hutchinson", samples, k == more)


def gauss_newton_trace(model: Any, loss_fn: Any, data: Any, probes: int = 100, *,
                       seed: int = 0, block: int = 16, params: Any = None,
                       eval_mode: bool = True, distributed: Any = False,
                       meter: Meter | None = None, route: Plan | None = None) -> TraceResult:
    """``tr H = tr G + tr R``: the Gauss-Newton part exactly, the residual estimated only on
    the parameter tensors the outputs are not affine in (:mod:`flatlab.curvature.gauss_newton`).

    ``tr R = sum_k tr R_kk``, and ``R_kk = 0`` for every tensor ``w_k`` the outputs are affine
    in. Nonlinear tensors that are the weight or bias of a Linear layer applied to one vector
    per example get their ``tr H_kk`` exactly from the diagonal of the loss Hessian in the
    layer's outputs (:func:`~flatlab.curvature.gauss_newton.linear_blocks`). The remaining
    tensors (the residual, dimension ``n``) get ``2 * probes`` Hessian or residual products
    on their principal block (:func:`_residual_block`): ``tr H_nn`` exactly when
    ``n <= 2 * probes``; otherwise Hutchinson, on ``H_nn`` (then ``tr H = tr G - tr G_nn +
    tr H_nn``) or on ``R_nn`` (``tr H = tr G + tr R_nn``), on the whole block or one tensor
    at a time, whichever a pilot of :data:`PILOT_PROBES` probes per tensor measures to have
    the lower variance per product. When none
    remain (piecewise-linear networks: ReLU, convolutions, pooling, eval-mode BatchNorm;
    MLPs with any activation), the trace is exact and ``stderr`` is 0. ``route``: a
    :func:`~flatlab.curvature.gauss_newton.plan` already made.
    """
    if int(probes) < MINIMUM_PROBES["gauss_newton"]:
        raise ValueError(f"probes must be >= {MINIMUM_PROBES['gauss_newton']} for "
                         f"gauss_newton (its residual's pilot), got {probes}")
    meter = meter or Meter("trace (gauss_newton)", None, progress=False, unit="passes")
    if route is None:
        route = plan(model, loss_fn, data, params, probes=int(probes), seed=seed,
                     eval_mode=eval_mode, distributed=distributed)
    nonlinear = route.residual
    gn = ggn_trace(model, loss_fn, data, params, eval_mode=eval_mode, distributed=distributed,
                   meter=meter, exact=route.exact, split=nonlinear, checked=True)
    if not nonlinear:
        return TraceResult(gn.value, gn.stderr, gn.passes, "gauss_newton", gn.per_example,
                           gn.converged)
    if not gn.converged:  # no budget left for the residual: tr H is not estimated
        return TraceResult(gn.value, float("inf"), gn.passes, "gauss_newton",
                           gn.per_example, False)
    kw = {"params": nonlinear, "eval_mode": eval_mode, "distributed": distributed}
    h = hessian_operator(model, loss_fn, data, **kw)
    r = residual_operator(model, loss_fn, data, **kw)
    sizes = [p.numel() for p in h.params]  # the residual's tensors, in the operator's order
    which, est = _residual_block(h, r, 2 * int(probes), seed, block, meter, sizes)
    base = gn.value - gn.split_value if which == "H" else gn.value
    return TraceResult(base + est.value, est.stderr, gn.passes + est.n_matvecs,
                       "gauss_newton", est.samples, est.converged)


def _batch_count(data: Any) -> int | None:
    """Batches in ``data`` when known without iterating it (a pair: 1; a sized iterable)."""
    if _is_pair(data):
        return 1
    try:
        return len(data)
    except TypeError:
        return None


def _auto(op_or_model: Any, loss_fn: Any, data: Any, probes: int, max_matvecs: Any,
          max_seconds: Any, seed: int, params: Any, eval_mode: bool, distributed: Any,
          ) -> tuple[str, Plan | None, int]:
    """``method="auto"``: the Gauss-Newton route whenever it applies within the products
    asked for, else XTrace; returns the method, its plan and its ``probes``.

    The route's passes per batch count as products (a pass over a batch costs about what a
    product over it does). With nothing left to estimate it is exact. With a residual left,
    it gets ``(probes - passes) // 2`` residual probes (``2 * probes`` products), at least
    4, so it spends the same products as XTrace would (on the networks of
    ``benchmarks/curvature.py --part trace-error`` where a residual is left it had the lower
    error; docs/benchmarks.md). XTrace for an operator, a loss or model the route does not
    apply to, too many outputs per example, or a ``max_matvecs`` the passes of every batch
    would exceed.
    """
    if not isinstance(op_or_model, nn.Module) or loss_fn is None or data is None:
        return "xtrace", None, probes
    if ranks_of(distributed) is not None and (max_matvecs is not None
                                              or max_seconds is not None):
        return "xtrace", None, probes  # gauss_newton takes no budget with distributed=
    budget = probes
    count = 1
    if max_matvecs is not None:
        count = _batch_count(data)
        if count is None:  # a budget in passes over batches that cannot be counted
            return "xtrace", None, probes
        budget = min(probes, int(max_matvecs))
    try:
        route = plan(op_or_model, loss_fn, data, params, probes=budget // count, total=True,
                     seed=seed, eval_mode=eval_mode, distributed=distributed)
    except NotApplicable:
        return "xtrace", None, probes
    if not route.residual:
        return "gauss_newton", route, max(probes, MINIMUM_PROBES["gauss_newton"])
    return "gauss_newton", route, (budget - route.passes * count) // 2


_ESTIMATORS = {"xtrace": xtrace, "xnystrace": xnystrace, "hutch++": hutchpp,
               "hutchinson": hutchinson}


def hessian_trace(
    op_or_model: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    probes: int = 100,
    method: str = "auto",
    seed: int = 0,
    block: int = 16,
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    progress: Any = True,
    params: Any = None,
    eval_mode: bool = True,
    distributed: Any = False,
) -> TraceResult:
    """Estimate ``tr(H)`` with ``probes`` Hessian-vector products.

    The default, ``"auto"``, takes the Gauss-Newton route (:func:`gauss_newton_trace`) for a
    model with a per-example mean loss when it fits in ``probes`` products, counting its
    passes per batch as products: exact when nothing is left to estimate (ReLU or tanh MLPs,
    ReLU convolutional networks in eval mode), otherwise the residual gets the products left:
    exact when its block is that small, else Hutchinson on its Hessian or its Hessian less
    Gauss-Newton block, whichever is less variable. It falls back to XTrace (an operator, a
    loss or model the route does not apply to, too many outputs per example). Of the four
    stochastic estimators, XTrace had the lowest error on small networks against their
    dense Hessians, indefinite ones included, and the route had lower error still
    (``benchmarks/curvature.py --part trace-error``; docs/benchmarks.md). ``method`` in the
    result names the route taken.

    Args:
        op_or_model: an operator, a square tensor, or a model (then ``loss_fn`` and ``data``
            follow, positionally or by keyword).
        probes: number of products (the total budget of every method).
        method: ``"auto"`` (default, above), ``"xtrace"``, ``"xnystrace"`` (PSD
            operators, e.g. a GGN), ``"hutch++"``, ``"hutchinson"``, or ``"gauss_newton"``
            (a model only: the Gauss-Newton trace exactly from per-example gradients, the
            Linear blocks of nonlinear tensors exactly, plus ``2 * probes`` products on the
            block of any other tensors the outputs are not affine in; see
            :func:`gauss_newton_trace`).
        seed: seed of the probes; block: probes per batched product.
        max_matvecs: product budget (``probes`` is cut to it; ``converged=False`` then).
            For ``"gauss_newton"`` it counts per-example gradient passes and the
            residual's products; when it ends, the examples done give the estimate, with
            their standard error (a single-process budget: refused with ``distributed``).
            A budget below the method's minimum runs Hutchinson on the budget instead
            (``method="hutchinson"`` in the result).
        max_seconds: wall-clock budget; when it ends, what was computed is returned with
            ``converged=False``.
        progress: a progress bar on stderr when it is a terminal (``False``: never).
        params, eval_mode, distributed: as for :func:`~flatlab.curvature.hessian_operator`
            (``distributed``: each rank its shard of the data, the trace of the full-data
            Hessian on every rank; the probes are the same on every rank).

    Raises:
        ValueError: a bad ``method``, ``probes`` below the method's minimum (4 for
            XTrace and for the Gauss-Newton residual, 3 for Hutch++, 2 for XNysTrace), or
            ``"gauss_newton"`` without a model (see :func:`gauss_newton_trace`).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> round(hessian_trace(A, probes=15).value, 6)
        15.0
    """
    method = check_choice("method", method, METHODS)
    probes = check_positive_int("probes", probes)
    route = None
    if method == "auto":
        method, route, probes = _auto(op_or_model, loss_fn, data, probes, max_matvecs,
                                      max_seconds, seed, params, eval_mode, distributed)
    if method == "gauss_newton":
        if not isinstance(op_or_model, nn.Module) or loss_fn is None or data is None:
            raise ValueError("method='gauss_newton' needs a model with loss_fn and data, got "
                             f"{type(op_or_model).__name__}"
                             + ("" if isinstance(op_or_model, nn.Module) else
                                " (an operator has no per-example Gauss-Newton part)"))
        with Meter("trace (gauss_newton)", None, max_matvecs=max_matvecs,
                   max_seconds=max_seconds, progress=progress, unit="passes",
                   ranks=ranks_of(distributed)) as meter:
            return gauss_newton_trace(op_or_model, loss_fn, data, probes, seed=seed,
                                      block=block, params=params, eval_mode=eval_mode,
                                      distributed=distributed, meter=meter, route=route)
    op = as_operator(op_or_model, loss_fn=loss_fn, data=data, params=params, eval_mode=eval_mode,
                     distributed=distributed)
    planned = probes if max_matvecs is None else min(probes, check_positive_int(
        "max_matvecs", max_matvecs))
    if planned < probes and planned < MINIMUM_PROBES[method]:
        # a budget below the method's minimum: what can be done is Hutchinson on the budget
        # (marked unconverged below), not an error about probes the caller did not set
        method = "hutchinson"
    with Meter(f"trace ({method})", planned, max_seconds=max_seconds,
               progress=progress, ranks=getattr(op, "ranks", None)) as meter:
        res = _ESTIMATORS[method](op, planned, seed=seed, block=block, meter=meter)
    if planned < probes and res.converged:
        res = TraceResult(res.value, res.stderr, res.n_matvecs, res.method, res.samples, False)
    return res
