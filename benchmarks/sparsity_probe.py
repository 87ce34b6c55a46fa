"""Overhead of the activation-sparsity probe over a bare forward pass (target ratio <= 1.15).

Model: ``flatlab.models.ResidualMLP`` (pre-LN residual ReLU MLP), data: random inputs in
batches. Both passes run in eval mode under ``torch.no_grad`` over the same batches; the
probed pass is :func:`flatlab.sparsity.activation_sparsity` (hooks on every block's ReLU,
zero-derivative, zero-output and FLOP counts). Timings are the median of ``--repeats``
interleaved repetitions, so drift on a shared machine hits both sides alike.

    .venv/bin/python benchmarks/sparsity_probe.py [--width 256] [--depth 4] [--n 8192]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flatlab.models import ResidualMLP
from flatlab.sparsity import activation_sparsity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--in-dim", type=int, default=64)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = ResidualMLP(args.in_dim, 10, width=args.width, depth=args.depth).eval()
    x = torch.randn(args.n, args.in_dim)
    data = [(xb, torch.zeros(len(xb))) for xb in x.split(args.batch)]

    def bare() -> None:
        with torch.no_grad():
            for xb, _ in data:
                model(xb)

    def probed() -> None:
        activation_sparsity(model, data)

    bare(), probed()  # warm-up
    t_bare, t_probe = [], []
    for _ in range(args.repeats):
        for fn, out in ((bare, t_bare), (probed, t_probe)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    b, p = statistics.median(t_bare), statistics.median(t_probe)
    ratio = p / b
    res = activation_sparsity(model, data)
    print(f"ResidualMLP width={args.width} hidden={4 * args.width} depth={args.depth}, "
          f"{args.n} examples in batches of {args.batch}, torch threads={torch.get_num_threads()}")
    print("| pass | median s | ratio |")
    print("|---|---|---|")
    print(f"| bare forward | {b:.4f} | 1.000 |")
    print(f"| activation_sparsity | {p:.4f} | {ratio:.3f} |")
    print(f"target <= 1.15: {'PASS' if ratio <= 1.15 else 'MISS'} "
          f"(mean sparsity {res.mean:.3f}, potential second-matmul savings {res.flop_savings:.3f})")


if __name__ == "__main__":
    main()
