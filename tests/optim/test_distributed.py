"""Two gloo processes on CPU: sync="global" and sync="local" each equal a single-process
computation of their stated semantics, and both ranks hold identical parameters after 5 steps.

global: every pass uses the gradient of the mean loss over all ranks' data (= SAM on the union
batch). local (m-sharpness): rank r perturbs with its own gradient g_r, and the descent gradient
is the mean over ranks of grad L_r(theta + rho g_r / ||g_r||). Each is run with a plain model
(the optimizer does the all-reduces) and with a DistributedDataParallel model (``model=``).
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatlab.optim import SAM

WORLD, STEPS, RHO, LR = 2, 5, 0.05, 0.1
CASES = [("global", False), ("global", True), ("local", False), ("local", True)]


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def shards() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(WORLD * 8, 3, generator=g, dtype=torch.float64)
    y = torch.randn(WORLD * 8, 1, generator=g, dtype=torch.float64)
    return list(zip(x.chunk(WORLD), y.chunk(WORLD)))


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    x, y = shards()[rank]
    results = {}
    for sync, use_ddp in CASES:
        model = make_model()
        net = nn.parallel.DistributedDataParallel(model) if use_ddp else model
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, sync=sync,
                  model=net if use_ddp else None, lr=LR, momentum=0.9)

        def closure(backward=torch.autograd.backward, opt=opt, net=net):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            backward(loss)
            return loss

        for _ in range(STEPS):
            opt.step(closure)
        results[(sync, use_ddp)] = [p.detach().clone() for p in model.parameters()]
    finish_rank(results, out, rank)


def reference(sync: str) -> list[torch.Tensor]:
    model = make_model()
    params = list(model.parameters())
    base = torch.optim.SGD(params, lr=LR, momentum=0.9)
    data = shards()

    def grad_at(x, y, shift):
        with torch.no_grad():
            for p, e in zip(params, shift):
                p.add_(e)
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x), y), params)
        with torch.no_grad():
            for p, e in zip(params, shift):
                p.sub_(e)
        return grads

    def perturbation(g):
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        return [RHO * t / (norm + 1e-12) for t in g]

    zero = [torch.zeros_like(p) for p in params]
    for _ in range(STEPS):
        if sync == "global":
            xs, ys = torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data])
            e = perturbation(grad_at(xs, ys, zero))
            d = grad_at(xs, ys, e)
        else:
            per_rank = [grad_at(x, y, perturbation(grad_at(x, y, zero))) for x, y in data]
            d = [sum(ts) / WORLD for ts in zip(*per_rank)]
        for p, g in zip(params, d):
            p.grad = g.clone()
        base.step()
    return [p.detach() for p in params]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finish_rank(results, out, rank: int) -> None:
    """A worker's last act: save ``results`` for :func:`run_ranks`, then leave the group
    together (the barrier first: gloo's teardown is flaky when one rank leaves early)."""
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(worker, out, world: int = 2) -> list:
    """Run ``worker(rank, port, str(out))`` at ``world`` forked ranks; load each rank's
    ``out/rank{r}.pt`` (written by :func:`finish_rank`). Skips the test where
    torch.distributed is not available. Fork: the children reuse the imported torch (spawn
    re-imports it, ~15 s more here)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=world, join=True,
                       start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("dist"), WORLD)


@pytest.mark.parametrize(
    ("sync", "use_ddp"), CASES, ids=[f"{s}-{'ddp' if d else 'plain'}" for s, d in CASES]
)
def test_sync_semantics(rank_results, sync, use_ddp):
    r0, r1 = (res[(sync, use_ddp)] for res in rank_results)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))  # identical on both ranks
    for got, want in zip(r0, reference(sync)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_global_and_local_differ(rank_results):
    a, b = rank_results[0][("global", False)], rank_results[0][("local", False)]
    assert not all(torch.allclose(x, y, rtol=0, atol=1e-9) for x, y in zip(a, b))
