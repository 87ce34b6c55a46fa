"""Per-step overhead of flatlab's sharpness-aware optimizers against plain SGD and against
``pytorch_optimizer``'s SAM (the ``bench`` extra), on CPU.

One process, 2 CPU threads, the same batch for every method. Each round runs every method in a
freshly shuffled order for ``--steps`` timed steps; the table reports the median of all
per-step times. SAM makes 2 forward+backward passes and one base step, so its natural unit is
2 x (SGD step): a ratio <= 1.00 means no overhead beyond the extra pass. GAM is reported
against its pass count (closure calls: 4 for the finite-difference variant, 2 plus two
Hessian-vector products for the exact one).

Models: a deep narrow MLP (30 blocks of Linear(128) + LayerNorm + ReLU, batch 64: many small
tensors, where an optimizer's own overhead shows) and a small CNN (compute-bound).

Usage::

    .venv/bin/python benchmarks/optim_overhead.py            # 50 rounds, a few minutes
    .venv/bin/python benchmarks/optim_overhead.py --rounds 5 # quick look
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

from flatlab.optim import GAM, SAM

BASE = {"lr": 0.01, "momentum": 0.9}


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


def make_steppers(factory: Callable) -> dict[str, Callable[[], None]]:
    """One (model, optimizer, step function) per method, all from the same initial weights."""
    torch.manual_seed(0)
    proto, x, y = factory()
    steppers: dict[str, Callable[[], None]] = {}

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    def add(name, build, drive):
        model = _clone(proto)
        opt = build(model)
        closure = closure_for(model, opt)
        steppers[name] = lambda: drive(opt, closure)
        steppers[name].opt = opt  # type: ignore[attr-defined]

    add("sgd", lambda m: torch.optim.SGD(m.parameters(), **BASE), lambda o, c: o.step(c))
    add("flatlab SAM", lambda m: SAM(m.parameters(), torch.optim.SGD, rho=0.05, **BASE),
        lambda o, c: o.step(c))
    try:
        from pytorch_optimizer import SAM as PoSAM

        def po_drive(opt, closure):
            closure()  # pytorch_optimizer needs the first gradient before step()
            opt.step(closure)

        add("pytorch_optimizer SAM",
            lambda m: PoSAM(m.parameters(), torch.optim.SGD, rho=0.05, **BASE), po_drive)
    except ImportError:
        print("pytorch_optimizer is not installed (pip install 'flatlab[bench]'); skipping it")
    add("flatlab GAM fd", lambda m: GAM(m.parameters(), torch.optim.SGD, **BASE),
        lambda o, c: o.step(c))
    add("flatlab GAM exact", lambda m: GAM(m.parameters(), torch.optim.SGD, hvp="exact", **BASE),
        lambda o, c: o.step(c))
    return steppers


def _clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def measure(
    steppers: dict[str, Callable[[], None]], rounds: int, steps: int, seed: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Median per-step time of each method; the garbage collector runs between rounds only
    (as in ``timeit``), so a collection does not land in one method's timing."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for name in names:  # warm-up: allocations, lazy state
        for _ in range(2):
            steppers[name]()
    for _ in range(rounds):
        rng.shuffle(names)
        gc.collect()
        gc.disable()
        try:
            for name in names:
                for _ in range(steps):
                    t0 = clock()
                    steppers[name]()
                    times[name].append(clock() - t0)
        finally:
            gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


PASSES = {"sgd": 1, "flatlab SAM": 2, "pytorch_optimizer SAM": 2, "flatlab GAM fd": 4,
          "flatlab GAM exact": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="shuffled rounds (default 50)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
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
          f"{args.steps} steps, medians of per-step {args.clock} times")
    header = (f"{'model':<9} {'method':<22} {'passes':>6} {'median ms':>10} "
              f"{'time/(passes x SGD)':>20}")
    print(header)
    print("-" * len(header))
    for model_name, factory in (("deep_mlp", deep_mlp), ("cnn", small_cnn)):
        steppers = make_steppers(factory)
        medians = measure(steppers, args.rounds, args.steps, seed=0, clock=clock)
        sgd = medians["sgd"]
        for name, med in medians.items():
            ratio = med / (PASSES[name] * sgd)
            note = " (+2 HVPs)" if name == "flatlab GAM exact" else ""
            print(f"{model_name:<9} {name:<22} {PASSES[name]:>6} {med * 1e3:>10.2f} "
                  f"{ratio:>20.3f}{note}")
        sam = steppers["flatlab SAM"].opt
        n_params = sum(p.numel() for g in sam.param_groups for p in g["params"])
        n_saved = sum(t.numel() for t in sam._saved)
        print(f"{model_name:<9} flatlab SAM extra persistent memory: {n_saved / n_params:.2f} "
              "parameter-sized buffers")


if __name__ == "__main__":
    main()
