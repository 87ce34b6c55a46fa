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
            r = hessian_trace(op, probes=probes, seed=seed)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    # PyHessian calls backward(create_graph=True), which makes torch warn about a reference cycle
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    torch.set_num_threads(args.threads)
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
