"""Two gloo processes on CPU: sync="global" and sync="local" each equal a single-process
computation of their stated semantics, and both ranks hold identical parameters after 5 steps.

global: every pass uses the gradient of the mean loss over all ranks' data (= SAM on the union
batch). local (m-sharpness): rank r perturbs with its own gradient g_r, and the descent gradient
is the mean over ranks of grad L_r(theta + rho g_r / ||g_r||). Each is run with a plain model
(the optimizer does the all-reduces), with a DistributedDataParallel model given as ``model=``,
and with one not given (as under Lightning): the optimizer then detects that DDP averages the
passes, skips its own all-reduce under "global", and refuses "local", which it cannot honour.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from flatlab.optim import SAM
from flatlab.optim._step import ENGINE_TRIES

WORLD, STEPS, RHO, LR = 2, 5, 0.05, 0.1
CASES = [("global", "plain"), ("global", "ddp"), ("global", "ddp-undeclared"),
         ("local", "plain"), ("local", "ddp")]


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
    for sync, mode in [*CASES, ("local", "ddp-undeclared")]:
        model = make_model()
        net = model if mode == "plain" else nn.parallel.DistributedDataParallel(model)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, sync=sync,
                  model=net if mode == "ddp" else None, lr=LR, momentum=0.9)

        def closure(backward=torch.autograd.backward, opt=opt, net=net):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            backward(loss)
            return loss

        try:
            for _ in range(STEPS):
                opt.step(closure)
        except ValueError as err:
            results[(sync, mode, "error")] = str(err)
        results[(sync, mode)] = [p.detach().clone() for p in model.parameters()]
        results[(sync, mode, "detected")] = opt._engine_averages
    # the same data on both ranks: nothing to tell, asked for ENGINE_TRIES steps only
    model = make_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    x0, y0 = shards()[0]

    def same(opt=opt, model=model):
        loss = nn.functional.mse_loss(model(x0), y0)
        loss.backward()
        return loss

    seen = []
    for _ in range(ENGINE_TRIES + 1):
        opt.step(same)
        seen.append(opt._engine_averages)
    results["same-data"] = seen
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


def run_ranks(worker, out, world: int = 2, start_method: str = "fork") -> list:
    """Run ``worker(rank, port, str(out))`` at ``world`` forked ranks; load each rank's
    ``out/rank{r}.pt`` (written by :func:`finish_rank`). Skips the test where
    torch.distributed is not available. Fork: the children reuse the imported torch (spawn
    re-imports it, ~15 s more here); CUDA workers need ``"spawn"`` (a forked child cannot
    use a CUDA context its parent may hold)."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=world, join=True,
                       start_method=start_method)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("dist"), WORLD)


@pytest.mark.parametrize(("sync", "mode"), CASES, ids=[f"{s}-{m}" for s, m in CASES])
def test_sync_semantics(rank_results, sync, mode):
    r0, r1 = (res[(sync, mode)] for res in rank_results)
    assert all(torch.equal(a, b) for a, b in zip(r0, r1))  # identical on both ranks
    for got, want in zip(r0, reference(sync)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_an_undeclared_ddp_is_detected_and_only_a_plain_model_is_reduced_by_the_optimizer(
    rank_results,
):
    for res in rank_results:
        assert res[("global", "ddp-undeclared", "detected")] is True
        assert res[("global", "plain", "detected")] is False
        assert res[("global", "ddp", "detected")] is None  # given: nothing to detect


def test_ranks_with_the_same_data_stop_looking_for_an_engine(rank_results):
    for res in rank_results:
        assert res["same-data"] == [None] * (ENGINE_TRIES - 1) + [False, False]


def test_local_sync_under_an_undeclared_ddp_is_refused_before_any_change(rank_results):
    """m-sharpness needs each rank's own gradient; DDP averaged it, and without the module the
    optimizer cannot use no_sync(): refused with the remedy, the parameters untouched."""
    for res in rank_results:
        message = res[("local", "ddp-undeclared", "error")]
        assert "sync='local' needs the DistributedDataParallel module as model=" in message
        assert "self.trainer.strategy.model" in message
        for got, want in zip(res[("local", "ddp-undeclared")], make_model().parameters()):
            assert torch.equal(got, want.detach())


def test_global_and_local_differ(rank_results):
    a, b = rank_results[0][("global", "plain")], rank_results[0][("local", "plain")]
    assert not all(torch.allclose(x, y, rtol=0, atol=1e-9) for x, y in zip(a, b))
