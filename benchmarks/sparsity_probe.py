"""Overhead of the activation-sparsity probe over a bare forward pass (target ratio <= 1.15).

Model: ``flatlab.models.ResidualMLP`` (pre-LN residual ReLU MLP, hidden = 4 x width), data:
random inputs in batches, eval mode, ``torch.no_grad``. Two measurements in one run:

* **per batch, interleaved**: a bare copy and a probed copy (same weights, a
  :class:`~flatlab.sparsity.SparsityProbe` attached) run each batch alternately, ``--repeats``
  times; each batch's time is the minimum over repeats (the usual estimator on a shared,
  noisy machine: other processes only ever add time), and the ratio is the sum over batches.
* **whole call**: :func:`flatlab.sparsity.activation_sparsity` over the dataset against a bare
  pass, median of interleaved repeats (includes mode switching, hook setup and the result).

    .venv/bin/python benchmarks/sparsity_probe.py [--width 256] [--depth 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from flatlab.models import ResidualMLP
from flatlab.sparsity import SparsityProbe, activation_sparsity


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--in-dim", type=int, default=64)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    bare = ResidualMLP(args.in_dim, 10, width=args.width, depth=args.depth).eval()
    probed = copy.deepcopy(bare)
    x = torch.randn(args.n, args.in_dim)
    data = [(xb, torch.zeros(len(xb))) for xb in x.split(args.batch)]

    # per batch, interleaved, min over repeats
    best_bare = [float("inf")] * len(data)
    best_probe = [float("inf")] * len(data)
    with torch.no_grad(), SparsityProbe(probed) as probe:
        for _ in range(args.repeats):
            for i, (xb, _) in enumerate(data):
                best_bare[i] = min(best_bare[i], _timed(bare, xb))
                best_probe[i] = min(best_probe[i], _timed(probed, xb))
    hook_ratio = sum(best_probe) / sum(best_bare)
    assert probe.result().entries  # the probe really counted

    # whole call, median of interleaved repeats
    def bare_pass() -> None:
        with torch.no_grad():
            for xb, _ in data:
                bare(xb)

    t_bare, t_call = [], []
    for _ in range(max(3, args.repeats // 2)):
        t_bare.append(_timed(bare_pass))
        t_call.append(_timed(activation_sparsity, bare, data))
    call_ratio = statistics.median(t_call) / statistics.median(t_bare)
    res = activation_sparsity(bare, data)

    print(f"ResidualMLP width={args.width} hidden={4 * args.width} depth={args.depth}, "
          f"{args.n} examples in batches of {args.batch}, torch threads={torch.get_num_threads()}")
    print("| measurement | bare s | probed s | ratio |")
    print("|---|---|---|---|")
    print(f"| per batch, min of {args.repeats} | {sum(best_bare):.4f} | {sum(best_probe):.4f} "
          f"| {hook_ratio:.3f} |")
    print(f"| activation_sparsity call, median | {statistics.median(t_bare):.4f} | "
          f"{statistics.median(t_call):.4f} | {call_ratio:.3f} |")
    print(f"target <= 1.15 (per batch): {'PASS' if hook_ratio <= 1.15 else 'MISS'}; "
          f"mean sparsity {res.mean:.3f}, potential second-matmul savings {res.flop_savings:.3f}")


if __name__ == "__main__":
    main()
