"""Per-step overhead of flatlab's sharpness-aware optimizers against plain SGD and against
``pytorch_optimizer``'s implementations of the same methods (the ``bench`` extra), on CPU.

One process, the same batch for every method, base ``SGD(lr=0.01, momentum=0.9)``. Each round
runs every method in a freshly shuffled order; one sample is the mean time of ``--steps``
consecutive steps (5 by default, a whole LookSAM cycle at ``k=5``), and the table reports the
median sample. Columns:

* ``calls``: closure calls (forward+backward passes) per step, averaged over a cycle;
* ``x SGD``: time / SGD step time;
* ``x calls*SGD``: time / (calls x SGD step): 1.00 means no overhead beyond the extra passes;
* ``vs PO``: flatlab's time / pytorch_optimizer's time for the same method in the same run
  (<= 1.00: flatlab no slower).

Models: the flatness study's MNIST-1D MLP (40-256-256-10, ReLU, batch 128: tiny steps, where a
fixed per-step cost shows), a deep narrow MLP (30 blocks of Linear(128) + LayerNorm + ReLU,
batch 64: many small tensors) and a small CNN (compute-bound).

pytorch_optimizer is driven by its documented recipe: GSAM with ``set_closure`` and
``step()``; WSAM with ``step(closure)``; SAM, LookSAM and FriendlySAM compute the first
gradient before ``step(closure)`` (so its LookSAM makes 2 passes on every step, both at theta
on the reuse steps).

Usage::

    .venv/bin/python benchmarks/optim_overhead.py              # 40 rounds, several minutes
    .venv/bin/python benchmarks/optim_overhead.py --rounds 3   # quick look
    .venv/bin/python benchmarks/optim_overhead.py --models small_mlp --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from flatlab.optim import GAM, GSAM, SAM, WSAM, FriendlySAM, LookSAM

BASE = {"lr": 0.01, "momentum": 0.9}


def small_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The flatness study's MNIST-1D MLP (flatlab.experiments.flatness, task mnist1d_mlp)."""
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    return model, torch.randn(128, 40), torch.randint(0, 10, (128,))


def deep_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    blocks = [nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.ReLU()) for _ in range(30)]
    model = nn.Sequential(*blocks, nn.Linear(128, 10))
    return model, torch.randn(64, 128), torch.randint(0, 10, (64,))


def small_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )
    return model, torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))


class _ConstantRho:
    """pytorch_optimizer's GSAM takes a radius scheduler; a constant one for the benchmark."""

    def __init__(self, rho: float) -> None:
        self.rho = rho

    def step(self) -> float:
        return self.rho


LOOKSAM_K = 5


def make_steppers(factory: Callable) -> dict[str, Callable[[], None]]:
    """One (model, optimizer, step function) per method, all from the same initial weights.
    Each stepper carries ``.calls`` (closure calls per step over a cycle) and ``.pair`` (the
    pytorch_optimizer method it is compared with)."""
    torch.manual_seed(0)
    proto, x, y = factory()
    steppers: dict[str, Callable[[], None]] = {}

    def closure_for(model, opt):
        def closure(backward=torch.autograd.backward):  # exact GAM hands its own backward
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            backward(loss)
            return loss

        return closure

    def add(name, build, drive, calls, pair=None):
        model = _clone(proto)
        opt = build(model)
        closure = closure_for(model, opt)
        fn = lambda: drive(opt, closure)  # noqa: E731
        fn.opt, fn.calls, fn.pair = opt, calls, pair  # type: ignore[attr-defined]
        steppers[name] = fn

    plain = lambda o, c: o.step(c)  # noqa: E731
    sgd = torch.optim.SGD
    add("sgd", lambda m: sgd(m.parameters(), **BASE), plain, 1)
    add("flatlab SAM", lambda m: SAM(m.parameters(), sgd, rho=0.05, **BASE), plain, 2,
        "po SAM")
    add("flatlab GAM fd", lambda m: GAM(m.parameters(), sgd, **BASE), plain, 4)
    add("flatlab GAM exact", lambda m: GAM(m.parameters(), sgd, hvp="exact", **BASE), plain, 2)
    add("flatlab GSAM", lambda m: GSAM(m.parameters(), sgd, rho=0.05, alpha=0.4, **BASE),
        plain, 2, "po GSAM")
    add("flatlab WSAM", lambda m: WSAM(m.parameters(), sgd, rho=0.05, gamma=0.9, **BASE),
        plain, 2, "po WSAM")
    add("flatlab LookSAM", lambda m: LookSAM(m.parameters(), sgd, rho=0.05, k=LOOKSAM_K,
                                             **BASE),
        plain, 1 + 1 / LOOKSAM_K, "po LookSAM")
    add("flatlab FriendlySAM", lambda m: FriendlySAM(m.parameters(), sgd, rho=0.05, **BASE),
        plain, 2, "po FriendlySAM")
    try:
        import pytorch_optimizer as po
    except ImportError:
        print("pytorch_optimizer is not installed (pip install 'flatlab[bench]'); skipping it")
        return steppers

    def first_gradient_then_step(opt, closure):
        closure()  # pytorch_optimizer needs the first gradient before step()
        opt.step(closure)

    def gsam(model):
        opt = po.GSAM(model.parameters(), sgd(model.parameters(), **BASE), model=model,
                      rho_scheduler=_ConstantRho(0.05), alpha=0.4)
        opt.set_closure(nn.functional.cross_entropy, x, y)
        return opt

    add("po SAM", lambda m: po.SAM(m.parameters(), sgd, rho=0.05, **BASE),
        first_gradient_then_step, 2)
    add("po GSAM", gsam, lambda o, c: o.step(), 2)
    add("po WSAM", lambda m: po.WSAM(m, m.parameters(), sgd, rho=0.05, gamma=0.9, **BASE),
        plain, 2)
    add("po LookSAM", lambda m: po.LookSAM(m.parameters(), sgd, rho=0.05, k=LOOKSAM_K, **BASE),
        first_gradient_then_step, 2)
    add("po FriendlySAM", lambda m: po.FriendlySAM(m.parameters(), sgd, rho=0.05, **BASE),
        first_gradient_then_step, 2)
    return steppers


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def measure(
    steppers: dict[str, Callable[[], None]], rounds: int, steps: int, seed: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Median over rounds of each method's mean step time over ``steps`` consecutive steps;
    the garbage collector runs between rounds only (as in ``timeit``), so a collection does
    not land in one method's timing."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for name in names:  # warm-up: allocations, lazy state, one LookSAM cycle
        for _ in range(LOOKSAM_K):
            steppers[name]()
    for _ in range(rounds):
        rng.shuffle(names)
        gc.collect()
        gc.disable()
        try:
            for name in names:
                t0 = clock()
                for _ in range(steps):
                    steppers[name]()
                times[name].append((clock() - t0) / steps)
        finally:
            gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


MODELS = {"small_mlp": small_mlp, "deep_mlp": deep_mlp, "cnn": small_cnn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="shuffled rounds (default 40)")
    parser.add_argument("--steps", type=int, default=LOOKSAM_K,
                        help=f"steps per sample (default {LOOKSAM_K}, a LookSAM cycle)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall",
        help="wall: time.perf_counter; cpu: time.process_time, the CPU time of this process "
        "only (use it with --threads 1 on a machine shared with other jobs, where wall time "
        "mostly measures waiting for a core)",
    )
    args = parser.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds x "
          f"{args.steps} steps, medians of per-sample mean {args.clock} times")
    header = (f"{'model':<10} {'method':<20} {'calls':>5} {'ms/step':>8} {'x SGD':>6} "
              f"{'x calls*SGD':>11} {'vs PO':>6}")
    print(header)
    print("-" * len(header))
    for model_name in args.models:
        steppers = make_steppers(MODELS[model_name])
        medians = measure(steppers, args.rounds, args.steps, seed=0, clock=clock)
        sgd = medians["sgd"]
        for name, med in medians.items():
            fn = steppers[name]
            pair = fn.pair  # type: ignore[attr-defined]
            vs = f"{med / medians[pair]:6.3f}" if pair in medians else f"{'':6}"
            note = " (+2 HVPs)" if name == "flatlab GAM exact" else ""
            print(f"{model_name:<10} {name:<20} {fn.calls:>5.1f} {med * 1e3:>8.3f} "  # type: ignore[attr-defined]
                  f"{med / sgd:>6.2f} {med / (fn.calls * sgd):>11.3f} {vs}{note}")  # type: ignore[attr-defined]
        sam = steppers["flatlab SAM"].opt  # type: ignore[attr-defined]
        n_params = sum(p.numel() for g in sam.param_groups for p in g["params"])
        n_saved = sum(t.numel() for t in sam._snapshot)
        print(f"{model_name:<10} flatlab SAM extra persistent memory: {n_saved / n_params:.2f} "
              "parameter-sized buffers")


if __name__ == "__main__":
    main()
