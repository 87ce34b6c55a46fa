"""flatlab.curvature vs PyHessian: Hessian-vector products and wall time at equal accuracy.

Same model (a tanh MLP, ~3.6k parameters, float32, briefly trained), same data (one batch;
PyHessian's fastest mode, which keeps the gradient graph and reuses it), same thread count,
one process. Reference: the dense Hessian of a float64 copy (``torch.autograd.functional``)
and ``eigvalsh``.

* Eigenvalues: for each method, a sweep of its own tolerance; for each target relative error
  (max over the top-k eigenvalues) the cheapest setting that reaches it is reported
  (products and seconds), plus PyHessian's defaults (``maxIter=100, tol=1e-3``).
* Trace: PyHessian's ``trace()`` defaults (Hutchinson with its stopping rule) over ``--reps``
  seeds gives a mean product count and an RMS relative error; flatlab's Hutch++ is run with
  the same number of products, and with the fewest products (from a sweep) whose RMS error is
  at most PyHessian's.

Run:  python benchmarks/curvature.py [--threads 1] [--reps 10]
Needs the ``bench`` extra (pyhessian).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import time
import warnings

import torch
from torch import nn

from flatlab.curvature import hessian_operator, hessian_trace, top_eigenvalues
from flatlab.curvature.gauss_newton import nonlinear_tensors


def build(seed: int = 0, n: int = 512):
    torch.manual_seed(seed)
    # 16*48+48 + 48*48+48 + 48*10+10 = 3658 parameters
    model = nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(),
                          nn.Linear(48, 10))
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 16, generator=g)
    teacher = torch.randn(16, 10, generator=g)
    y = (x @ teacher + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):  # a partly trained network, not the random initialization
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def dense_reference(model, x, y):
    m64 = copy.deepcopy(model).double()
    names = [k for k, _ in m64.named_parameters()]
    like = [p.detach() for p in m64.parameters()]

    def f(theta):
        parts, s = [], 0
        for t in like:
            parts.append(theta[s : s + t.numel()].view_as(t))
            s += t.numel()
        out = torch.func.functional_call(m64, dict(zip(names, parts)), (x.double(),))
        return nn.functional.cross_entropy(out, y)

    theta = torch.cat([t.reshape(-1) for t in like])
    H = torch.autograd.functional.hessian(f, theta)
    return H


def rel_err(values, truth) -> float:
    v = torch.as_tensor(values, dtype=torch.float64)
    return float(((v - truth).abs() / truth.abs()).max())


class Counter:
    """Wraps pyhessian.hessian.hessian_vector_product to count products."""

    def __init__(self, module):
        self.module, self.count = module, 0
        self.orig = module.hessian_vector_product

        def counted(*args, **kwargs):
            self.count += 1
            return self.orig(*args, **kwargs)

        module.hessian_vector_product = counted


def pyhessian_eigs(model, x, y, k, tol, max_iter=100):
    ph = importlib.import_module("pyhessian.hessian")  # the package exports a class of that name

    m = copy.deepcopy(model)
    counter = Counter(ph)
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        hc = ph.hessian(m, nn.functional.cross_entropy, data=(x, y), cuda=False)
        vals, _ = hc.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        dt = time.perf_counter() - t0
    finally:
        ph.hessian_vector_product = counter.orig
    return sorted(vals, reverse=True), counter.count, dt


def flatlab_eigs(model, x, y, k, tol):
    t0 = time.perf_counter()
    op = hessian_operator(model, nn.functional.cross_entropy, (x, y))
    res = top_eigenvalues(op, k=k, tol=tol, max_matvecs=2000)
    return res.values.tolist(), res.n_matvecs, time.perf_counter() - t0


def cheapest(runs, truth, target):
    ok = [(n, t, e) for (e, n, t) in runs if e <= target]
    return min(ok) if ok else None


def eig_table(model, x, y, truth_desc, targets):
    rows = []
    for k in (1, 5):
        truth = truth_desc[:k]
        ph_runs = []
        for tol in (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8):
            vals, n, dt = pyhessian_eigs(model, x, y, k, tol, max_iter=1000)
            ph_runs.append((rel_err(vals, truth), n, dt))
        fl_runs = []
        for tol in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5):
            vals, n, dt = flatlab_eigs(model, x, y, k, tol)
            fl_runs.append((rel_err(vals, truth), n, dt))
        vals, n, dt = pyhessian_eigs(model, x, y, k, 1e-3)
        rows.append((f"top-{k}", "PyHessian defaults", rel_err(vals, truth), n, dt))
        for target in targets:
            for name, runs in (("PyHessian", ph_runs), ("flatlab Lanczos", fl_runs)):
                best = cheapest(runs, truth, target)
                if best is None:
                    nan = float("nan")
                    rows.append((f"top-{k}", f"{name} @ {target:g}", nan, -1, nan))
                else:
                    n, t, e = best
                    rows.append((f"top-{k}", f"{name} @ {target:g}", e, n, t))
    return rows


def trace_table(model, x, y, truth, reps):
    ph = importlib.import_module("pyhessian.hessian")  # the package exports a class of that name

    errs, counts, times = [], [], []
    for seed in range(reps):
        m = copy.deepcopy(model)
        counter = Counter(ph)
        try:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            hc = ph.hessian(m, nn.functional.cross_entropy, data=(x, y), cuda=False)
            est = float(sum(hc.trace()) / counter.count)
            times.append(time.perf_counter() - t0)
        finally:
            ph.hessian_vector_product = counter.orig
        counts.append(counter.count)
        errs.append((est - truth) / truth)
    rms = lambda e: (sum(v * v for v in e) / len(e)) ** 0.5  # noqa: E731
    ph_rms, ph_n = rms(errs), sum(counts) / len(counts)
    rows = [("trace", "PyHessian defaults", ph_rms, ph_n, sum(times) / len(times))]

    def ours(probes):
        e, ts = [], []
        for seed in range(reps):
            t0 = time.perf_counter()
            op = hessian_operator(model, nn.functional.cross_entropy, (x, y))
            r = hessian_trace(op, probes=probes, seed=seed, method="hutch++")
            ts.append(time.perf_counter() - t0)
            e.append((r.value - truth) / truth)
        return rms(e), sum(ts) / len(ts)

    same = max(3, int(round(ph_n)))
    e, t = ours(same)
    rows.append(("trace", "flatlab Hutch++ same products", e, same, t))
    sweep = []
    for probes in (6, 9, 12, 15, 21, 30, 45, 60, 90, 120, 180, 240):
        e, t = ours(probes)
        sweep.append(f"{probes}: {e:.2e}")
        if e <= ph_rms:
            rows.append(("trace", "flatlab Hutch++ at PyHessian's error", e, probes, t))
            break
    print("Hutch++ RMS relative error by products:", ", ".join(sweep))
    return rows


# ---- trace error on small networks against their dense Hessian (--part trace-error) -------

class _Tokens(nn.Module):
    """The 16 inputs as tokens: a per-token tanh MLP (its Linear weights shared along the
    tokens, so no exact Linear blocks), then a linear head."""

    def __init__(self, width: int, classes: int):
        super().__init__()
        self.a, self.b = nn.Linear(1, width), nn.Linear(width, width)
        self.head = nn.Linear(16 * width, classes)

    def forward(self, x):
        h = torch.tanh(self.b(torch.tanh(self.a(x.unsqueeze(-1)))))
        return self.head(h.flatten(1))


class _Custom(nn.Module):
    """A tanh MLP whose first layer is a hand-written ``F.linear`` (not an ``nn.Linear``)."""

    def __init__(self, d: int, width: int, classes: int):
        super().__init__()
        first = nn.Linear(d, width)
        self.w, self.b = nn.Parameter(first.weight.detach()), nn.Parameter(first.bias.detach())
        self.mid, self.out = nn.Linear(width, width), nn.Linear(width, classes)

    def forward(self, x):
        h = torch.tanh(nn.functional.linear(x, self.w, self.b))
        return self.out(torch.tanh(self.mid(h)))


def small_network(kind: str, width: int, classes: int, seed: int = 0, n: int = 256):
    """A float64 network (8 or 16 inputs) on teacher labels, ``init`` or Adam-``trained``:
    ``relu``/``tanh``: an MLP; ``tanhconv``: two 3x3 convolutions with ``width`` channels and
    tanh on the 16 inputs as a 4x4 image, then a linear layer; ``tokens``: :class:`_Tokens`;
    ``custom``: :class:`_Custom`. The last three are outside the exact route's structure."""
    torch.manual_seed(seed)
    act = nn.Tanh if kind.startswith("tanh") else nn.ReLU
    d = 16 if classes > 4 else 8
    if kind.startswith("tanhconv"):
        model = nn.Sequential(nn.Unflatten(1, (1, 4, 4)), nn.Conv2d(1, width, 3, padding=1),
                              act(), nn.Conv2d(width, width, 3, padding=1), act(),
                              nn.Flatten(), nn.Linear(16 * width, classes))
    elif kind.startswith("tokens"):
        model = _Tokens(width, classes)
    elif kind.startswith("custom"):
        model = _Custom(d, width, classes)
    else:
        model = nn.Sequential(nn.Linear(d, width), act(), nn.Linear(width, width), act(),
                              nn.Linear(width, classes))
    model = model.double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x @ torch.randn(d, classes, generator=g, dtype=torch.float64)).argmax(1)
    if kind.endswith("trained"):
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(300):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model, x, y


def pyhessian_hutchinson(model, x, y, products: int, seed: int) -> float:
    """PyHessian's ``trace()`` run for exactly ``products`` probes (its tol rule disabled)."""
    ph = importlib.import_module("pyhessian.hessian")
    torch.manual_seed(seed)
    hc = ph.hessian(copy.deepcopy(model), nn.functional.cross_entropy, data=(x, y), cuda=False)
    vhv = hc.trace(maxIter=products, tol=-float("inf"))
    assert len(vhv) == products
    return float(sum(vhv) / len(vhv))


TRACE_NETWORKS = (("tanh-init", 8, 4), ("tanh-init", 16, 10), ("relu-init", 16, 10),
                  ("relu-trained", 12, 4), ("relu-trained", 16, 10), ("tanh-trained", 16, 10),
                  ("tanhconv-init", 4, 10), ("tanhconv-trained", 4, 10),
                  ("tanhconv-init", 8, 10), ("tokens-init", 4, 10), ("tokens-trained", 4, 10),
                  ("custom-init", 16, 10), ("custom-trained", 16, 10))


def _median(values) -> float:
    errs = sorted(values)
    return (errs[(len(errs) - 1) // 2] + errs[len(errs) // 2]) / 2


def median_ratio_interval(a, b, level: float = 0.95, n_boot: int = 4000,
                          seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``median(a) / median(b)`` for two independent samples
    (each resampled with replacement, seeded): how far a 48-seed median ratio can move."""
    import numpy as np

    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    ra = np.median(xa[rng.integers(0, xa.size, (n_boot, xa.size))], axis=1)
    rb = np.median(xb[rng.integers(0, xb.size, (n_boot, xb.size))], axis=1)
    lo, hi = np.quantile(ra / rb, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def trace_error_table(products: int = 60, seeds: int = 48) -> None:
    """Median relative error |t - tr H| / |tr H| over seeds, every estimator at ``products``.

    PyHessian runs on the model; flatlab's stochastic estimators run on the dense Hessian
    (the same products; ``tests/curvature/test_xtrace.py`` checks the model operator against
    it), so that many seeds are affordable. The default, ``hessian_trace(model, loss_fn,
    data, probes=products)`` (``"auto"``), runs on the model as a user calls it; its products
    (passes, for the Gauss-Newton route) are printed, and its CPU time over that of XTrace on
    the model at the same products (median of 5 interleaved pairs). "95% CI" is a
    percentile bootstrap of the default's ratio over the seeds (:func:`median_ratio_interval`).
    The last rows are geometric means of the ratios and the default's worst ratio.
    """
    import math

    from flatlab.curvature.trace import hutchinson, hutchpp, xtrace

    CE = nn.functional.cross_entropy
    print(f"trace error at {products} products, median over {seeds} seeds, dense float64 "
          "Hessian as the truth")
    head = (f"| {'network':22} | {'n':>4} | {'tr H':>8} | {'lambda_min/max':>15} | "
            f"{'PyHessian':>9} | {'Hutch++':>8} | {'XTrace':>8} | {'XTrace/PyH':>10} | "
            f"{'default (route, products)':>34} | {'default/PyH':>11} | "
            f"{'95% CI':>15} | {'time / XTrace':>13} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    logs = {"hutch++": [], "xtrace": [], "hutchinson": []}
    worst, met, bounded, estimated = 0.0, 0, 0, []
    for kind, width, classes in TRACE_NETWORKS:
        model, x, y = small_network(kind, width, classes)
        H = hessian_operator(model, CE, (x, y)).to_dense()
        op = H
        ev = torch.linalg.eigvalsh(H)
        truth = float(torch.trace(H))

        def rel(values, truth=truth):
            return [abs(v - truth) / abs(truth) for v in values]

        def med(values):
            return _median(rel(values))

        ph_errs = rel(pyhessian_hutchinson(model, x, y, products, s) for s in range(seeds))
        ph = _median(ph_errs)
        hpp = med(hutchpp(op, products, seed=s).value for s in range(seeds))
        xt = med(xtrace(op, products, seed=s).value for s in range(seeds))
        # the same estimator in flatlab, as a check of the PyHessian reference
        hut = med(hutchinson(op, products, seed=s).value for s in range(seeds))
        runs = [hessian_trace(model, CE, (x, y), probes=products, seed=s, progress=False)
                for s in range(seeds)]
        dflt_errs = rel(r.value for r in runs)
        dflt = _median(dflt_errs)
        lo, hi = median_ratio_interval(dflt_errs, ph_errs)
        routes = sorted({(r.method, r.n_matvecs) for r in runs})
        # time: the default against XTrace on the model, both as a user calls them, at the
        # same products; CPU seconds, 5 interleaved rounds, medians of the ratio
        ratios = []
        for r in range(5):
            pair = {}
            for key in (("auto", "xtrace") if r % 2 else ("xtrace", "auto")):
                _, pair[key] = _cpu(lambda key=key, r=r, m=model, d=(x, y): hessian_trace(
                    m, CE, d, probes=products, method=key, seed=r, progress=False))
            ratios.append(pair["auto"] / pair["xtrace"])
        ratios.sort()
        time_ratio = ratios[len(ratios) // 2]
        for key, v in (("hutch++", hpp), ("xtrace", xt), ("hutchinson", hut)):
            logs[key].append(math.log(v / ph))
        worst = max(worst, dflt / ph)
        met += dflt / ph <= 0.35
        bounded += hi <= 0.35
        if any(r.stderr > 0 for r in runs):
            estimated.append(math.log(dflt / ph))
        name = f"{kind} {width}w {classes}c"
        route = ", ".join(f"{m} {k}" for m, k in routes)
        print(f"| {name:22} | {H.shape[0]:4d} | {truth:8.3f} | "
              f"{float(ev[0]):7.3f}/{float(ev[-1]):.3f} | {ph:9.4f} | {hpp:8.4f} | {xt:8.4f} | "
              f"{xt / ph:10.2f} | {dflt:9.2e} ({route:>22}) | {dflt / ph:11.2e} | "
              f"{lo:7.2g}-{hi:<7.2g} | "
              f"{time_ratio:13.2f} |  "
              f"(flatlab Hutchinson {hut:.4f})")
    gm = {k: math.exp(sum(v) / len(v)) for k, v in logs.items()}
    print(f"geometric mean of error / PyHessian's: Hutch++ {gm['hutch++']:.2f}, XTrace "
          f"{gm['xtrace']:.2f}, flatlab Hutchinson {gm['hutchinson']:.2f}")
    gm_est = math.exp(sum(estimated) / len(estimated)) if estimated else float("nan")
    print(f"the default: error / PyHessian's <= 0.35 on {met} of {len(TRACE_NETWORKS)} "
          f"networks, largest {worst:.2f}; geometric mean {gm_est:.2f} over the "
          f"{len(estimated)} where it estimates a residual; the 95% CI's upper end <= 0.35 on "
          f"{bounded}")


def _off2(A: torch.Tensor) -> float:
    """``||A||_off^2``: the squared Frobenius norm of the off-diagonal part of ``A``."""
    return float(A.square().sum() - A.diagonal().square().sum())


def ggn_residual_table() -> None:
    """Why no GGN control variate rescues the trace at initialisation. ``H = G + R`` with ``G``
    the Gauss-Newton part; an exact ``tr G`` plus a Hutchinson estimate of ``tr R`` has error
    ~ sqrt(2/m) ||R||_off, against sqrt(2/m) ||H||_off for Hutchinson on ``H``
    (``||.||_off``: the Frobenius norm of the off-diagonal part). The table prints both norms
    and ``tr R`` on the networks of ``--part trace-error``."""
    from flatlab.curvature import ggn_operator

    def off(A):
        return _off2(A) ** 0.5

    print(f"| {'network':22} | {'tr H':>8} | {'tr G':>8} | {'tr R':>8} | {'||H||_off':>9} | "
          f"{'||R||_off':>9} | {'ratio':>6} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 11}|{'-' * 11}|{'-' * 8}|")
    for kind, width, classes in TRACE_NETWORKS:
        model, x, y = small_network(kind, width, classes)
        H = hessian_operator(model, nn.functional.cross_entropy, (x, y)).to_dense()
        G = ggn_operator(model, nn.functional.cross_entropy, (x, y)).to_dense()
        R = H - G
        name = f"{kind} {width}w {classes}c"
        print(f"| {name:22} | {float(H.trace()):8.3f} | {float(G.trace()):8.3f} | "
              f"{float(R.trace()):8.3f} | {off(H):9.3f} | {off(R):9.3f} | "
              f"{off(R) / off(H):6.3f} |")


def _residual_networks():
    """For each network of :data:`TRACE_NETWORKS` whose Gauss-Newton route leaves a residual
    (at 60 products): its name, the residual's tensors, their coordinates in the flat
    parameter vector (``name -> (n_k,)`` index tensors), the dense ``H`` and ``G``, and the
    network with its data, ``(model, x, y)``."""
    from flatlab.curvature import ggn_operator
    from flatlab.curvature.gauss_newton import plan

    CE = nn.functional.cross_entropy
    for kind, width, classes in TRACE_NETWORKS:
        model, x, y = small_network(kind, width, classes)
        residual = plan(model, CE, (x, y), probes=60).residual
        if not residual:
            continue
        offsets, start = {}, 0
        for name, p in model.named_parameters():
            offsets[name] = torch.arange(start, start + p.numel())
            start += p.numel()
        H = hessian_operator(model, CE, (x, y)).to_dense()
        G = ggn_operator(model, CE, (x, y)).to_dense()
        yield f"{kind} {width}w {classes}c", residual, offsets, H, G, (model, x, y)


def control_variate_table(probes: int = 25, seeds: int = 400) -> None:
    """Why the residual's ``R_nn`` branch keeps the coefficient 1 on its Gauss-Newton samples.

    On the residual block of each network of :data:`TRACE_NETWORKS` that has one (dense
    ``H_nn``, ``G_nn``; ``probes`` Rademacher probes, each one ``H`` and one ``G`` product),
    the RMS error over ``seeds`` of ``mean(d - beta e)`` (``d = a - b``, ``e = b - tr G_nn``,
    ``a = z^T H z``, ``b = z^T G z``) with ``beta`` = 0 (Hutchinson on ``R_nn``, the rule's
    choice), fitted leave-one-out (unbiased), fitted on all samples, and the best fixed value
    ``c* - 1 = <R, G>_off / ||G||_off^2`` (an oracle: it needs the matrices), and Hutchinson
    on ``H_nn`` with ``2 x probes`` probes (the same products). Errors relative to
    ``tr H_nn``."""
    import statistics

    from flatlab.curvature.trace import _rademacher

    print(f"residual block, {probes} probes x 2 products, RMS error / tr H_nn over {seeds} "
          f"seeds")
    print(f"| {'network':22} | n_res | {'c*':>5} | {'beta=0':>8} | {'LOO fit':>8} | "
          f"{'full fit':>8} | {'oracle':>8} | {'H_nn x2':>8} |")
    print(f"|{'-' * 24}|-------|-------|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, residual, offsets, H, G, _ in _residual_networks():
        idx = torch.cat([offsets[t] for t in residual])
        H, G = H[idx][:, idx], G[idx][:, idx]
        n, trg, trh = len(idx), float(G.trace()), float(H.trace())
        off = ~torch.eye(n, dtype=torch.bool)
        cstar = float((H * G)[off].sum() / (G * G)[off].sum())
        errs = {k: [] for k in ("beta=0", "LOO fit", "full fit", "oracle", "H_nn x2")}
        for s in range(seeds):
            gen = torch.Generator().manual_seed(s)
            Z = _rademacher(n, 2 * probes, gen, H.dtype, H.device)
            a_all = (Z * (H @ Z)).sum(0)
            a, b = a_all[:probes], (Z[:, :probes] * (G @ Z[:, :probes])).sum(0)
            d, e = a - b, b - trg
            de, ee = d * e, e * e
            loo = (de.sum() - de) / (ee.sum() - ee)
            est = {"beta=0": trg + float(d.mean()),
                   "LOO fit": trg + float((d - loo * e).mean()),
                   "full fit": trg + float((d - de.sum() / ee.sum() * e).mean()),
                   "oracle": trg + float((d - (cstar - 1) * e).mean()),
                   "H_nn x2": float(a_all.mean())}
            for k, v in est.items():
                errs[k].append((v - trh) ** 2)
        rms = {k: statistics.fmean(v) ** 0.5 / abs(float(trh)) for k, v in errs.items()}
        print(f"| {name:22} | {n:5d} | {cstar:5.3f} | " + " | ".join(
            f"{rms[k]:8.4f}" for k in errs) + " |", flush=True)


def residual_split_table(seeds: int = 400, products: int = 60) -> None:
    """Hutchinson's variance per product on the residual block, probed jointly or one
    parameter tensor at a time (exact, from the dense blocks), and the rule's error.

    Jointly, ``K`` Rademacher probes of ``A_nn`` have variance ``2 ||A_nn||_off^2 / K``, which
    includes the blocks coupling two tensors. A probe supported on tensor ``i`` alone costs
    one product too and samples ``tr A_ii`` without them; with the products split optimally
    (``K_i`` proportional to ``||A_ii||_off``) the variance is ``2 (sum_i ||A_ii||_off)^2 /
    K``. ``A`` is ``H_nn`` or ``R_nn = H_nn - G_nn`` (one product a probe each, by
    :func:`~flatlab.curvature.residual_operator`). The table prints the four variances per
    product, the standard deviation of the best split over the best joint option, and then,
    at the products the default gives the residual at ``products`` (``K``): the median error
    over ``seeds`` of :func:`~flatlab.curvature.trace._residual_block` on the dense blocks
    (the rule, with its pilot), of an oracle that knows the best option (``0.674 sqrt(var /
    K)``), and PyHessian's Hutchinson at ``products`` probes of the whole Hessian (``0.674
    sqrt(2 ||H||_off^2 / products)``, its median for Gaussian errors), all relative to
    ``tr H``, with the rule's choices."""
    import statistics
    from collections import Counter

    from flatlab.curvature import as_operator
    from flatlab.curvature._progress import Meter
    from flatlab.curvature.gauss_newton import plan
    from flatlab.curvature.trace import _residual_block

    print("residual block: Hutchinson variance per product, joint or per tensor (dense); "
          f"median error / |tr H| over {seeds} seeds at the default's residual products")
    head = (f"| {'network':22} | m | {'H joint':>8} | {'R joint':>8} | {'H split':>8} | "
            f"{'R split':>8} | split/joint (std) |  K | {'rule':>7} | {'oracle':>7} | "
            f"{'PyH':>7} | rule/PyH | choices |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    CE = nn.functional.cross_entropy
    for name, residual, offsets, H, G, (model, x, y) in _residual_networks():
        idx = torch.cat([offsets[t] for t in residual])
        var = {}
        for label, A in (("H", H), ("R", H - G)):
            var[f"{label} joint"] = 2 * _off2(A[idx][:, idx])
            var[f"{label} split"] = 2 * sum(
                _off2(A[offsets[nm]][:, offsets[nm]]) ** 0.5 for nm in residual) ** 2
        best = {w: min(var[f"H {w}"], var[f"R {w}"]) for w in ("joint", "split")}
        route = plan(model, CE, (x, y), probes=products, total=True)
        K = 2 * ((products - route.passes) // 2)
        tr = abs(float(H.trace()))
        Hn, Rn = H[idx][:, idx], (H - G)[idx][:, idx]
        truth = {"H": float(Hn.trace()), "R": float(Rn.trace())}
        sizes = [len(offsets[nm]) for nm in residual]
        errs, picks = [], Counter()
        for s in range(seeds):
            meter = Meter("t", None, progress=False)
            which, est = _residual_block(as_operator(Hn), as_operator(Rn), K, s, 64, meter,
                                         sizes)
            errs.append(abs(est.value - truth[which]) / tr)
            picks[which] += 1
        rule = statistics.median(errs)
        oracle = 0.674 * (min(best.values()) / K) ** 0.5 / tr if len(idx) > K else 0.0
        pyh = 0.674 * (2 * _off2(H) / products) ** 0.5 / tr
        print(f"| {name:22} | {len(residual)} | " + " | ".join(
            f"{var[k]:8.4g}" for k in ("H joint", "R joint", "H split", "R split"))
            + f" | {(best['split'] / best['joint']) ** 0.5:17.3f} | {K:2d} | {rule:7.4f} | "
            f"{oracle:7.4f} | {pyh:7.4f} | {rule / pyh:8.3f} | "
            + " ".join(f"{k}:{v}" for k, v in sorted(picks.items())) + " |", flush=True)


# ---- CIFAR-shaped ResNet-20 against PyHessian, CPU time, interleaved rounds (--part resnet) -

def resnet20(seed: int = 0, batch: int = 64):
    """ResNet-20 (272k parameters), BatchNorm statistics from 8 training-mode passes, then
    eval mode; one CIFAR-shaped batch of random images with random labels (offline)."""
    from flatlab.models.resnet import ResNet

    torch.manual_seed(seed)
    model = ResNet(depth=20)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(8):
            model(torch.randn(batch, 3, 32, 32, generator=g))
    model.eval()
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, x, y


def _cpu(fn):
    t0 = time.process_time()
    out = fn()
    return out, time.process_time() - t0


def resnet_table(rounds: int = 3, seed: int = 0,
                 quantities: tuple[str, ...] = ("top-1", "top-3", "trace"),
                 xtrace_search: bool = True) -> None:
    """top-1 (tol 1e-3), top-3 and trace at equal estimated error: median CPU seconds.

    ``quantities`` restricts the table; without ``xtrace_search`` the XTrace row uses the
    80 products of the 3 December search instead of searching again."""
    import random
    import statistics

    ph = importlib.import_module("pyhessian.hessian")
    CE = nn.functional.cross_entropy
    model, x, y = resnet20(seed)
    n = sum(p.numel() for p in model.parameters())

    # high-precision reference: float64 copy, Lanczos to a residual of 1e-9
    m64 = copy.deepcopy(model).double()
    truth = []
    if "top-1" in quantities or "top-3" in quantities:
        ref_op = hessian_operator(m64, CE, (x.double(), y))
        (ref, ref_s) = _cpu(lambda: top_eigenvalues(ref_op, 3, tol=1e-9, progress=False))
        truth = ref.values.tolist()
        print(f"reference (float64 Lanczos, tol 1e-9, {ref.n_matvecs} products, {ref_s:.0f} "
              f"CPU s): top-3 {[f'{v:.6g}' for v in truth]}")
    print(f"ResNet-20, {n} parameters, batch {x.shape[0]}, float32, BatchNorm eval, threads "
          f"{torch.get_num_threads()}")
    if "trace" in quantities:
        # tr H of the float64 copy: its Gauss-Newton trace, exact when every tensor enters
        # affinely (checked and printed)
        nonlin = nonlinear_tensors(m64, (x.double(), y))
        tr64, tr_s = _cpu(lambda: hessian_trace(m64, CE, (x.double(), y),
                                                method="gauss_newton", progress=False))
        print(f"trace reference (float64 Gauss-Newton, {tr_s:.0f} CPU s): {tr64.value:.8g}, "
              f"tensors entering nonlinearly: {nonlin or 'none'}")

    def fl_eigs(k, stop="residual", init=None):
        # the default start is the loss gradient mixed with a random vector; init="random"
        # is the random start alone (the default before 7 December)
        op = hessian_operator(model, CE, (x, y))
        r = top_eigenvalues(op, k, tol=1e-3, progress=False, stop=stop, init=init)
        return r.values.tolist(), r.n_matvecs

    def ph_eigs(k):
        torch.manual_seed(seed)
        counter = Counter(ph)
        try:
            hc = ph.hessian(copy.deepcopy(model), CE, data=(x, y), cuda=False)
            vals, _ = hc.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
        finally:
            ph.hessian_vector_product = counter.orig
        return sorted(vals, reverse=True), counter.count

    def ph_trace(s):
        torch.manual_seed(s)
        hc = ph.hessian(copy.deepcopy(model), CE, data=(x, y), cuda=False)
        vhv = torch.tensor(hc.trace(maxIter=100, tol=1e-3), dtype=torch.float64)
        se = float(vhv.std() / len(vhv) ** 0.5) if len(vhv) > 1 else float("inf")
        return float(vhv.mean()), se, len(vhv)

    def fl_trace(probes, s):
        op = hessian_operator(model, CE, (x, y))
        r = hessian_trace(op, probes=probes, seed=s, progress=False)
        return r.value, r.stderr, r.n_matvecs

    def gn_trace(s):
        # the default on the model ("auto"), which takes the Gauss-Newton route here
        r = hessian_trace(model, CE, (x, y), seed=s, progress=False)
        assert r.method == "gauss_newton", r.method
        return r.value, r.stderr, r.n_matvecs

    # equal error: the fewest XTrace products whose own error estimate is at most the
    # median of PyHessian's (std / sqrt(K) of its Hutchinson samples, its default stop rule)
    probes = 80  # measured on 3 December: XTrace's estimate first reaches PyHessian's at 80
    if "trace" in quantities and xtrace_search:
        ph_se = statistics.median(ph_trace(s)[1] for s in range(3))
        probes = None
        for p in (10, 20, 30, 40, 60, 80, 120, 160):
            if fl_trace(p, 0)[1] <= ph_se:
                probes = p
                break
        probes = probes or 160
        print(f"trace: PyHessian's error estimate {ph_se:.4g} (median of 3 runs); XTrace "
              f"reaches it at {probes} products")

    tasks = {
        ("top-1", "flatlab"): lambda r: fl_eigs(1), ("top-1", "PyHessian"): lambda r: ph_eigs(1),
        ("top-1", "flatlab, stop='value'"): lambda r: fl_eigs(1, "value"),
        ("top-1", "flatlab, init='random'"): lambda r: fl_eigs(1, init="random"),
        ("top-3", "flatlab"): lambda r: fl_eigs(3), ("top-3", "PyHessian"): lambda r: ph_eigs(3),
        ("top-3", "flatlab, init='random'"): lambda r: fl_eigs(3, init="random"),
        ("trace", "flatlab, operator"): lambda r: fl_trace(probes, r),
        ("trace", "flatlab, model (auto)"): lambda r: gn_trace(r),
        ("trace", "PyHessian"): lambda r: ph_trace(r),
    }
    tasks = {key: f for key, f in tasks.items() if key[0] in quantities}
    times = {key: [] for key in tasks}
    last = {}
    order = list(tasks)
    rng = random.Random(seed)
    for r in range(rounds):
        rng.shuffle(order)
        for key in order:
            last[key], dt = _cpu(lambda key=key, r=r: tasks[key](r))
            times[key].append(dt)
    print(f"| quantity | {'method':22} | {'CPU s (median)':>14} | {'ratio':>5} | "
          f"{'products':>8} | {'max rel. error vs reference / stderr':36} |")
    print(f"|----------|{'-' * 24}|{'-' * 16}|{'-' * 7}|{'-' * 10}|{'-' * 38}|")
    for q in [q for q in ("top-1", "top-3", "trace") if q in quantities]:
        base = statistics.median(times[(q, "PyHessian")])
        for who in [w for qq, w in tasks if qq == q]:
            t = statistics.median(times[(q, who)])
            out = last[(q, who)]
            if q == "trace":
                value, se, used = out
                acc = f"{value:.5g} +- {se:.3g} (error {abs(value - tr64.value):.3g})"
            else:
                vals, used = out
                k = len(vals)
                acc = f"{rel_err(vals, torch.tensor(truth[:k], dtype=torch.float64)):.2e}"
            print(f"| {q:8} | {who:22} | {t:14.2f} | {t / base:5.2f} | {used:8d} | {acc:36} |")


def product_table(rounds: int = 12, seed: int = 0) -> None:
    """CPU seconds of one Hessian-vector product on the ResNet-20 of :func:`resnet20`, after
    construction: flatlab's operator (cached gradient graph) against PyHessian's
    ``hessian_vector_product`` through its kept graph; medians of interleaved products."""
    import random
    import statistics

    ph = importlib.import_module("pyhessian.hessian")
    CE = nn.functional.cross_entropy
    model, x, y = resnet20(seed)
    op = hessian_operator(model, CE, (x, y))
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(seed))
    op.matvec(v)  # builds the graph
    hc = ph.hessian(copy.deepcopy(model), CE, data=(x, y), cuda=False)
    vs = [torch.randn_like(p) for p in hc.params]
    calls = {"flatlab": lambda: op.matvec(v),
             "PyHessian": lambda: ph.hessian_vector_product(hc.gradsH, hc.params, vs)}
    times: dict = {k: [] for k in calls}
    rng = random.Random(seed)
    for _ in range(rounds):
        for key in rng.sample(list(calls), len(calls)):
            times[key].append(_cpu(calls[key])[1])
    fl, py = (statistics.median(times[k]) for k in ("flatlab", "PyHessian"))
    print(f"ResNet-20, one product, {rounds} interleaved rounds, threads "
          f"{torch.get_num_threads()}, path {op.path}: flatlab {fl:.3f} CPU s, PyHessian "
          f"{py:.3f} CPU s, ratio {fl / py:.2f}")


def _trained_resnet20(steps: int = 40):
    """:func:`resnet20` after ``steps`` of SGD (lr 0.05, momentum 0.9, training mode) on its
    batch, which it then fits (loss about 1e-3), back in eval mode."""
    model, x, y = resnet20(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def start_table(seeds: int = 8, tol: float = 1e-3) -> None:
    """Lanczos products to ``tol`` (residual rule) from the gradient start (the loss gradient
    mixed with a random vector) against the random start alone, paired on the same random
    vectors: the small float64 networks of :func:`small_network` and the float32 MLP of
    :func:`build` (``seeds`` random vectors each), then the ResNet-20 of :func:`resnet20` at
    three initialisations and trained (2 random vectors each). ``H``: the Hessian, ``G``: the
    Gauss-Newton matrix (small networks only). The overlap is ``|<g, u_1>| / ||g||``, with
    ``u_1`` the Hessian's top eigenvector."""
    import statistics

    from flatlab.curvature import ggn_operator

    CE = nn.functional.cross_entropy
    nets = [(f"{kind} {w}w", lambda kind=kind, w=w: small_network(kind, w, 10))
            for kind, w in (("tanh-init", 16), ("relu-init", 16), ("relu-trained", 16),
                            ("tanh-trained", 16), ("tanhconv-init", 4), ("tanhconv-trained", 4),
                            ("tokens-trained", 4))]
    nets.append(("mlp-3658 (float32)", build))
    nets += [(f"resnet-20 init {s}", lambda s=s: resnet20(s)) for s in range(3)]
    nets.append(("resnet-20 trained", _trained_resnet20))
    operators = {"H": hessian_operator, "G": ggn_operator}
    cases = [(1, "largest", "H"), (3, "largest", "H"), (1, "smallest", "H"), (1, "largest", "G")]
    print(f"Lanczos products to tol {tol:g} (residual rule), median [min-max] over random "
          f"vectors; 'gradient' = init='gradient' (the default for the Hessian's 'largest'), "
          f"'random' = init='random' (the default otherwise)")
    print(f"| {'network':20} | {'n':>6} | overlap | {'op, k, which':15} | {'random':>13} | "
          f"{'gradient':>13} | paired diff |")
    print(f"|{'-' * 22}|{'-' * 8}|---------|{'-' * 17}|{'-' * 15}|{'-' * 15}|-------------|")
    for name, make in nets:
        model, x, y = make()
        resnet = name.startswith("resnet")
        op = hessian_operator(model, CE, (x, y))
        u = top_eigenvalues(op, 1, tol=1e-6, progress=False, max_matvecs=300).vectors[:, 0]
        g = op.gradient()
        overlap = float((g.to(u.dtype) @ u).abs() / g.norm())
        n = g.numel()
        for k, which, kind in cases[:1] if resnet else cases:
            counts = {"random": [], "gradient": []}
            for s in range(2 if resnet else seeds):
                for init in counts:
                    r = top_eigenvalues(operators[kind](model, CE, (x, y)), k, which=which,
                                        tol=tol, init=init, seed=s, progress=False)
                    counts[init].append(r.n_matvecs)
            cell = {i: f"{statistics.median(c):5.1f} [{min(c)}-{max(c)}]"
                    for i, c in counts.items()}
            diff = statistics.median(a - b for a, b in zip(counts["gradient"], counts["random"]))
            print(f"| {name:20} | {n:6d} | {overlap:7.2f} | {kind}, {k}, {which:9} | "
                  f"{cell['random']:>13} | {cell['gradient']:>13} | {diff:+11.1f} |", flush=True)


def stop_rules_table(n: int = 400, seeds: int = 8, tol: float = 1e-3) -> None:
    """top-1 error and products of Lanczos' two stopping rules, against PyHessian's rule
    (power iteration until the relative change of the estimate is < tol), on dense symmetric
    matrices: a separated top, a top cluster within 1e-3, and an evenly spread spectrum."""
    import statistics

    def pyhessian_rule(A, seed):
        g = torch.Generator().manual_seed(seed)
        v = torch.randint(0, 2, (A.shape[0],), generator=g).double() * 2 - 1
        v, prev = v / v.norm(), None
        for i in range(100):
            w = A @ v
            lam, v = float(v @ w), w / w.norm()
            if prev is not None and abs(lam - prev) / (abs(prev) + 1e-6) < tol:
                return lam, i + 1
            prev = lam
        return lam, 100

    print(f"top-1 of {n} x {n} symmetric matrices, tol {tol}, {seeds} seeds: median / worst "
          "relative error, median products")
    print("| spectrum | rule | median error | worst error | products |")
    print("|---|---|---|---|---|")
    for name in ("separated", "top cluster", "even"):
        rows: dict[str, list[tuple[float, int]]] = {}
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
            if name == "separated":
                lam = torch.cat([torch.tensor([23.3, 13.8, 12.2], dtype=torch.float64),
                                 2 * torch.randn(n - 3, generator=g, dtype=torch.float64)])
            elif name == "top cluster":
                lam = torch.cat([torch.tensor([10.0, 9.99, 9.9], dtype=torch.float64),
                                 torch.randn(n - 3, generator=g, dtype=torch.float64)])
            else:
                lam = torch.linspace(-3, 10, n, dtype=torch.float64)
            A, top = (Q * lam) @ Q.T, float(lam.max())
            for stop in ("residual", "value"):
                r = top_eigenvalues(A, 1, tol=tol, stop=stop, seed=seed, progress=False)
                rows.setdefault(f"flatlab stop='{stop}'", []).append(
                    (abs(r.value - top) / top, r.n_matvecs))
            est, used = pyhessian_rule(A, seed)
            rows.setdefault("PyHessian's rule (power)", []).append((abs(est - top) / top, used))
        for rule, vals in rows.items():
            errs = [e for e, _ in vals]
            print(f"| {name} | {rule} | {statistics.median(errs):.1e} | {max(errs):.1e} | "
                  f"{statistics.median(u for _, u in vals):g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("mlp", "trace-error", "resnet", "products",
                                           "stop-rules", "ggn-residual", "start",
                                           "control-variate", "residual-split"),
                        default="mlp", help="mlp: the table of the module docstring")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quantities", default="top-1,top-3,trace",
                        help="resnet: the rows to measure, comma-separated")
    parser.add_argument("--no-xtrace-search", action="store_true",
                        help="resnet: XTrace at 80 products, without searching again")
    parser.add_argument("--reps", type=int, default=10, help="mlp: seeds of the trace rows")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds a network: trace-error (default 48), residual-split (400)")
    parser.add_argument("--rounds", type=int, default=3, help="resnet: interleaved rounds "
                        "(products: 4x as many products)")
    args = parser.parse_args()
    # PyHessian calls backward(create_graph=True), which makes torch warn about a reference cycle
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    torch.set_num_threads(args.threads)
    parts = {
        "trace-error": lambda: trace_error_table(seeds=args.seeds or 48),
        "resnet": lambda: resnet_table(args.rounds, quantities=tuple(args.quantities.split(",")),
                                       xtrace_search=not args.no_xtrace_search),
        "products": lambda: product_table(4 * args.rounds),  # 12 products each by default
        "ggn-residual": ggn_residual_table,
        "stop-rules": stop_rules_table,
        "start": start_table,
        "control-variate": control_variate_table,
        "residual-split": lambda: residual_split_table(seeds=args.seeds or 400),
    }
    if args.part in parts:
        parts[args.part]()
        return
    model, x, y = build()
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    H = dense_reference(model, x, y)
    ev = torch.linalg.eigvalsh(H)
    truth_desc = ev.flip(0)
    print(f"model: tanh MLP, {n_params} parameters, float32, {x.shape[0]} examples, "
          f"threads={args.threads}; dense reference {time.perf_counter() - t0:.1f}s")
    print(f"top-5 eigenvalues: {[round(float(v), 5) for v in truth_desc[:5]]}, "
          f"trace {float(torch.trace(H)):.5f}")
    rows = eig_table(model, x, y, truth_desc, (1e-3, 1e-5))
    rows += trace_table(model, x, y, float(torch.trace(H)), args.reps)
    print(f"| {'quantity':8} | {'method':38} | {'rel. error':>10} | {'HVPs':>7} | {'seconds':>8} |")
    print(f"|{'-' * 10}|{'-' * 40}|{'-' * 12}|{'-' * 9}|{'-' * 10}|")
    for q, name, err, n, t in rows:
        ns = "n/a" if n < 0 else f"{n:g}"
        print(f"| {q:8} | {name:38} | {err:10.2e} | {ns:>7} | {t:8.3f} |")


if __name__ == "__main__":
    main()
