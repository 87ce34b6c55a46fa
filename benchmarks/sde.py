"""Benchmark: flatlab.sde.simulate against torchsde's Euler solver on the same SDE.

The SignSGD SDE under Gaussian noise (Compagnoni et al., ICLR 2025, Cor 3.3) on the issue's
quadratic f = 0.5 sum lambda_i x_i^2, lambda = linspace(0.5, 5, d), sigma = 1, lr = dt = 0.01:
    dX = -erf(grad f / (sigma sqrt 2)) dt + sqrt(lr) sqrt(1 - erf(.)^2) dW   (diagonal noise)
2000 paths x 10 dims x 1000 steps by default. Three integrators of the same equation:
flatlab (records the loss statistics at the first and last step), torchsde.sdeint(method=
"euler", dt=lr, diagonal noise, default Brownian interval) and the simplest hand-written torch
loop (the floor). Prints the best of ``--repeats`` wall times and the ratios.

    .venv/bin/python benchmarks/sde.py [--paths 2000] [--dim 10] [--steps 1000] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torchsde

from flatlab.sde import GaussianNoise, Quadratic, SignSGDSDE, simulate


class TorchsdeSignSGD(torch.nn.Module):
    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, lam: torch.Tensor, sigma: float, lr: float) -> None:
        super().__init__()
        self.lam, self.sigma, self.lr = lam, sigma, lr

    def f(self, t, y):
        return -torch.erf(self.lam * y / (self.sigma * math.sqrt(2)))

    def g(self, t, y):
        m = torch.erf(self.lam * y / (self.sigma * math.sqrt(2)))
        return math.sqrt(self.lr) * torch.sqrt(1 - m * m)


def hand_loop(lam, sigma, lr, x, steps, gen):
    c = 1 / (sigma * math.sqrt(2))
    root = math.sqrt(lr * lr)  # sqrt(lr * dt) with dt = lr
    for _ in range(steps):
        m = torch.erf(lam * x * c)
        x = x - lr * m + root * torch.sqrt(1 - m * m) * torch.randn(x.shape, generator=gen,
                                                                    dtype=x.dtype)
    return x


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    lr, sigma = 0.01, 1.0
    lam = torch.linspace(0.5, 5, args.dim, dtype=dtype)
    x0 = torch.full((args.paths, args.dim), 2.0, dtype=dtype)
    sde = SignSGDSDE(Quadratic(lam), GaussianNoise(sigma), lr)
    ts = torch.tensor([0.0, args.steps * lr], dtype=dtype)
    ref = TorchsdeSignSGD(lam, sigma, lr)

    def run_flatlab():
        return simulate(sde, x0, args.steps, record_every=args.steps, seed=0)

    def run_torchsde():
        return torchsde.sdeint(ref, x0, ts, method="euler", dt=lr)

    def run_loop():
        return hand_loop(lam, sigma, lr, x0, args.steps, torch.Generator().manual_seed(0))

    # Same equation, same answer (mean final loss, different random draws).
    final = {
        "flatlab": float(run_flatlab()["loss_mean"][-1]),
        "torchsde": float(Quadratic(lam).loss(run_torchsde()[-1]).mean()),
        "hand loop": float(Quadratic(lam).loss(run_loop()).mean()),
    }
    times = {
        "flatlab": best_of(run_flatlab, args.repeats),
        "torchsde": best_of(run_torchsde, args.repeats),
        "hand loop": best_of(run_loop, args.repeats),
    }
    print(f"SignSGD SDE, {args.paths} paths x {args.dim} dims x {args.steps} steps, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, torchsde "
          f"{torchsde.__version__}")
    print(f"{'integrator':<12}{'time (s)':>10}{'torchsde / this':>18}{'final mean loss':>18}")
    for name, t in times.items():
        print(f"{name:<12}{t:>10.3f}{times['torchsde'] / t:>18.2f}{final[name]:>18.4f}")


if __name__ == "__main__":
    main()
