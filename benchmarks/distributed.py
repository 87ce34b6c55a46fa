"""SAM's per-step cost under FSDP2 and under DDP, relative to plain training with the same
engine: two gloo processes on CPU, a model with many tensors.

Each rank trains its own copy of a deep narrow MLP (30 blocks of Linear(128) + LayerNorm +
ReLU, batch 32 per rank). Per engine there are two models, one stepped by plain SGD and one by
flatlab's SAM (base SGD), both wrapped the same way (``fully_shard`` per block plus the root,
or ``DistributedDataParallel``). Every round runs the four (engine, method) pairs in a
shuffled order that both ranks share; a sample is the mean wall time of ``--steps`` steps on
rank 0, and the table reports medians. SAM makes two forward-backward passes, so the ratio
is SAM / (2 x plain step): 1.00 means no cost beyond the second pass (and, for FSDP2, the
second pass's all-gathers and reduce-scatters, which the ratio counts as part of a pass).

Usage::

    .venv/bin/python benchmarks/distributed.py              # 30 rounds, about a minute
    .venv/bin/python benchmarks/distributed.py --rounds 5   # quick look
    .venv/bin/python benchmarks/distributed.py --shell      # one process, no engine: what
                                                            # each part of a SAM step costs
    .venv/bin/python benchmarks/distributed.py --exact      # also SAM+GAM (exact HVPs)
    python benchmarks/distributed.py --device cuda --world 1 --threads 4 --exact
                                                            # NCCL, one process per GPU

``--exact`` adds SAM+GAM (``SAMGAM``, base SGD) under each engine: 3 passes, 2 of them graph
passes with a Hessian-vector product each. Under FSDP2 the graph passes gather the unsharded
parameters (``flatlab.optim._fsdp``), so the table reports SAM+GAM / plain step per engine and
the ratio of the two: what FSDP2's gathered graph passes cost relative to DDP's, per plain
step of each engine.
"""

from __future__ import annotations

import argparse
import random
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatlab.optim import SAM, SAMGAM


def deep_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.ReLU())
              for _ in range(30)]
    return nn.Sequential(*blocks, nn.Linear(128, 10))


def _build(engine: str, method: str, device: str = "cpu"):
    from torch.distributed.fsdp import fully_shard

    model = deep_mlp().to(device)
    if engine == "fsdp2":
        for block in model:
            fully_shard(block)
        fully_shard(model)
        net = model
    else:
        net = nn.parallel.DistributedDataParallel(model)
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    elif method == "samgam":  # model= under both engines (FSDP2 needs it for the HVPs)
        opt = SAMGAM(model.parameters(), torch.optim.SGD, rho=0.05, sam_rho=0.05, lr=0.01,
                     momentum=0.9, model=net)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9,
                  model=net if engine == "ddp" else None)
    return net, opt


def _worker(rank: int, port: int, rounds: int, steps: int, threads: int, world: int,
            exact: bool = False, device: str = "cpu") -> None:
    torch.set_num_threads(threads)
    backend = "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
        device, backend = f"cuda:{rank}", "nccl"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    gen = torch.Generator().manual_seed(rank)
    x, y = torch.randn(32, 128, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    x, y = x.to(device), y.to(device)
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    runs = {}
    for engine in ("fsdp2", "ddp"):
        for method in ("sgd", "sam", "samgam") if exact else ("sgd", "sam"):
            net, opt = _build(engine, method, device)

            def closure(backward=torch.autograd.backward, net=net, opt=opt):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x), y)
                backward(loss)
                return loss

            runs[(engine, method)] = (opt, closure)
    for opt, closure in runs.values():  # warm-up
        for _ in range(3):
            opt.step(closure)
    times: dict = {k: [] for k in runs}
    order = list(runs)
    rng = random.Random(0)  # the same order on both ranks
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            opt, closure = runs[key]
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                opt.step(closure)
            sync()
            times[key].append((time.perf_counter() - t0) / steps)
    if rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"torch {torch.__version__}, {world} {backend} process(es) x {threads} thread(s), "
              f"{rounds} rounds x {steps} steps, medians of rank 0's wall time per step")
        print(f"{'engine':<7} {'plain ms':>9} {'SAM ms':>8} {'SAM / (2 x plain)':>18}")
        for engine in ("fsdp2", "ddp"):
            plain, sam = med[(engine, "sgd")], med[(engine, "sam")]
            print(f"{engine:<7} {plain * 1e3:>9.2f} {sam * 1e3:>8.2f} "
                  f"{sam / (2 * plain):>18.3f}")
        if exact:
            per = {e: med[(e, "samgam")] / med[(e, "sgd")] for e in ("fsdp2", "ddp")}
            print(f"{'engine':<7} {'SAM+GAM ms':>11} {'SAM+GAM / plain':>16}")
            for engine in ("fsdp2", "ddp"):
                print(f"{engine:<7} {med[(engine, 'samgam')] * 1e3:>11.2f} "
                      f"{per[engine]:>16.3f}")
            print(f"(SAM+GAM / plain) under FSDP2 / the same under DDP: "
                  f"{per['fsdp2'] / per['ddp']:.3f}")
    dist.barrier()
    dist.destroy_process_group()


def shell_table(rounds: int = 60) -> None:
    """One process, no engine, the same model and batch: medians of interleaved calls of one
    forward-backward, the base SGD step and each fused pass the SAM shell makes over the
    parameters, then SAM / (2 x plain) from whole steps and the ratio those parts predict."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 128, generator=gen), torch.randint(0, 10, (32,), generator=gen)
    model = deep_mlp()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def forward_backward():
        base.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()

    forward_backward()
    base.step()
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    data = [p.detach() for p in params]
    parts = {
        "forward-backward": forward_backward,
        "base SGD step": base.step,
        "gradient norm": lambda: torch._foreach_norm(grads),
        "snapshot / restore copy": lambda: torch._foreach_copy_(saved, data),
        "perturbation add": lambda: torch._foreach_add_(data, grads, alpha=0.0),
    }
    steps = {}
    for method in ("sgd", "sam"):
        m = deep_mlp()
        opt = (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) if method == "sgd" else
               SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9))

        def closure(m=m, opt=opt):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss

        steps[f"{method} step"] = lambda opt=opt, closure=closure: opt.step(closure)
    calls = {**parts, **steps}
    for fn in calls.values():  # warm-up
        for _ in range(3):
            fn()
    times: dict = {k: [] for k in calls}
    rng = random.Random(0)
    order = list(calls)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            t0 = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, 1 process, 1 thread, {rounds} interleaved rounds, "
          "medians in ms")
    for key, ms in med.items():
        print(f"{key:<24} {ms:8.3f}")
    fb, sgd = med["forward-backward"], med["base SGD step"]
    shell = 2 * med["gradient norm"] + 2 * med["snapshot / restore copy"] + med[
        "perturbation add"]
    print(f"SAM / (2 x plain) measured: {med['sam step'] / (2 * med['sgd step']):.3f}; "
          f"predicted from the parts (2 fb + 1 step + 2 norms + 2 copies + 1 add): "
          f"{(2 * fb + sgd + shell) / (2 * (fb + sgd)):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--world", type=int, default=2, help="processes (1: the engines' "
                        "own cost without a second rank competing for the cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: "
                        "NCCL, rank r on GPU r, spawned processes")
    parser.add_argument("--exact", action="store_true", help="also SAM+GAM (exact "
                        "Hessian-vector products) under each engine")
    parser.add_argument("--shell", action="store_true", help="one process, no engine: the "
                        "cost of each part of a SAM step (shell_table)")
    args = parser.parse_args()
    if args.shell:
        shell_table(2 * args.rounds)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, args.rounds, args.steps, args.threads, args.world,
                                         args.exact, args.device),
                       nprocs=args.world, join=True,
                       start_method="spawn" if args.device == "cuda" else "fork")


if __name__ == "__main__":
    main()
