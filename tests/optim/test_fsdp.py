"""The SAM family under FSDP2 (``fully_shard``), two gloo processes on CPU.

Every optimizer of the contract registry (tests/optim/_registry.py) trains a float64 model
whose parameters are DTensor shards (one ``fully_shard`` per Linear plus the root; the last
layer has 3 rows, so the shards are uneven) for 5 steps, each rank on its half of the batch.
FSDP averages each pass's gradient over the ranks, so with ``sync="global"`` this must equal the
same optimizer in one process on the whole batch. Norms are reduced over the shards (one
all-reduce each) and no parameter is gathered by the optimizer.

The same registry under DDP (``model=`` the DDP module, ``sync="global"``) and with a plain
model in the process group (the optimizer all-reduces) must equal it too.

Also: a non-finite loss on one rank only is skipped by both; ``sync="local"`` is refused; the
state_dict round trip through ``torch.distributed.checkpoint`` resumes bit for bit.
"""

from __future__ import annotations

import functools
import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flatlab.optim import SAM
from tests.optim._registry import REGISTRY, step
from tests.optim.test_distributed import finish_rank, run_ranks

WORLD, STEPS, LR = 2, 5, 0.05
#: methods whose Hessian-vector products need a double backward: under FSDP2 the optimizer
#: gathers the parameters for their graph passes (model= the module; flatlab.optim._fsdp);
#: under DDP their graph passes bypass the reducer, so the optimizer reduces g and H g itself
EXACT_HVP = {"gam_exact", "samgam"}
CARRIED = ["gam_exact", "samgam", "sam"]
NAN_STEP = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(nan_on_rank1: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for t in range(STEPS):
        x = torch.randn(WORLD * 4, 6, generator=g, dtype=torch.float64)
        y = torch.randn(WORLD * 4, 3, generator=g, dtype=torch.float64)
        if nan_on_rank1 and t == NAN_STEP:
            x[-1, 0] = float("nan")  # in rank 1's half only
        out.append((x, y))
    return out


def _closure(model, x, y):
    def closure(backward=torch.autograd.backward):
        loss = nn.functional.mse_loss(model(x), y)
        backward(loss)
        return loss

    return closure


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


class Scaled(nn.Module):
    """Three Linears, the middle one left to the root's FSDP group, and a parameter of the
    root's own: the graph passes must gather both kinds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b, self.c = nn.Linear(6, 7), nn.Linear(7, 5), nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor([1.5, 0.5, 1.0]))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _shard_scaled(model: Scaled) -> Scaled:
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.a)
    fully_shard(model.c, reshard_after_forward=False)
    fully_shard(model)
    return model


def _carried_run(name: str, rank: int | None, kind: str = "fsdp") -> list[torch.Tensor]:
    """3 steps on :class:`Scaled`, each after one micro-batch whose gradient is carried into
    the step (gradient accumulation); ``rank`` None: one process on whole batches."""
    entry = next(e for e in REGISTRY if e.name == name)
    model = Scaled()
    if rank is not None:
        _shard_scaled(model)
    opt = entry.build(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9,
                      model=model)
    data = batches()
    for t in range(3):
        (xa, ya), (xb, yb) = data[t], data[t + 1]
        if rank is not None:
            xa, ya = xa.chunk(WORLD)[rank], ya.chunk(WORLD)[rank]
            xb, yb = xb.chunk(WORLD)[rank], yb.chunk(WORLD)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(model(xa), ya).backward()  # the micro-batch before the step
        step(opt, _closure(model, xb, yb))
    return _full(model) if rank is not None else [p.detach() for p in model.parameters()]


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def _train(entry, rank: int | None, data, model=None, opt=None, start: int = 0,
           stop: int = STEPS, ddp: bool = False, plain: bool = False):
    """``rank`` None: one process, whole batches; else this rank's half, FSDP2-sharded (or
    wrapped in DDP, or ``plain``: an unwrapped model, the optimizer all-reduces)."""
    net = model
    if model is None:
        model = make_model()
        net = model
        if rank is not None and ddp:
            net = nn.parallel.DistributedDataParallel(model)
        elif rank is not None and not plain:
            _shard(model)
        # exact HVPs under FSDP2 need the module (to gather its parameters); the other
        # methods run from the parameters alone
        given = ddp or (rank is not None and not plain and entry.name in EXACT_HVP)
        opt = entry.build(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9,
                          **({"model": net} if given else {}))
    for x, y in data[start:stop]:
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        step(opt, _closure(net, x, y))
    return model, opt


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    results: dict = {}
    for entry in REGISTRY:
        try:
            model, opt = _train(entry, rank, batches())
            results[entry.name] = {"params": _full(model), "steps": opt.steps,
                                   "skipped": opt.skipped_steps}
            model, opt = _train(entry, rank, batches(nan_on_rank1=True))
            results[entry.name]["nan_params"] = _full(model)
            results[entry.name]["nan_skipped"] = opt.skipped_steps
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            results[entry.name] = {"error": traceback.format_exc()}
        for kind in ("ddp", "plain"):
            try:
                model, _ = _train(entry, rank, batches(), ddp=kind == "ddp",
                                  plain=kind == "plain")
                results[f"{kind}/{entry.name}"] = [p.detach().clone()
                                                   for p in model.parameters()]
            except Exception:  # noqa: BLE001
                results[f"{kind}/{entry.name}"] = traceback.format_exc()
    # exact HVPs without model= are refused before the closure runs; the step leaves the
    # modules resharded, with the user's reshard_after_backward put back
    x, y = batches()[0]
    x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
    entry = next(e for e in REGISTRY if e.name == "gam_exact")
    model = _shard(make_model())
    before = [p.detach().to_local().clone() for p in model.parameters()]
    opt = entry.build(model.parameters(), torch.optim.SGD, lr=LR)
    try:
        step(opt, _closure(model, x, y))
        results["no_model"] = "accepted"
    except ValueError as err:
        results["no_model"] = str(err)
    results["no_model_untouched"] = all(
        torch.equal(a, p.detach().to_local()) for a, p in zip(before, model.parameters()))
    model = _shard(make_model())
    model[0].set_reshard_after_backward(False, recurse=False)
    opt = entry.build(model.parameters(), torch.optim.SGD, lr=LR, model=model)
    step(opt, _closure(model, x, y))
    results["after_step"] = {
        "dtensors": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        "settings": [m._get_fsdp_state()._fsdp_param_groups[0].reshard_after_backward
                     for m in (model[0], model[2])],
    }
    for name in CARRIED:
        try:
            results[f"carried/{name}"] = _carried_run(name, rank)
        except Exception:  # noqa: BLE001
            results[f"carried/{name}"] = traceback.format_exc()
    try:
        model = _shard(make_model())
        opt = entry.build(model.parameters(), torch.optim.SGD, lr=LR,
                          model=_shard(make_model()))
        step(opt, _closure(model, x, y))
        results["other_model"] = "accepted"
    except ValueError as err:
        results["other_model"] = str(err)
    results["mixed"] = _mixed_precision(rank)
    # a closure that takes backward but calls loss.backward(): refused, the model resharded
    model = _shard(make_model())
    opt = entry.build(model.parameters(), torch.optim.SGD, lr=LR, model=model)

    def ignores(backward=torch.autograd.backward):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    try:
        step(opt, ignores)
        results["ignores"] = "accepted"
    except ValueError as err:
        results["ignores"] = str(err)
    results["ignores_resharded"] = all(type(p).__name__ == "DTensor"
                                       for p in model.parameters())
    # sync="local" is refused with a clear error
    model = _shard(make_model())
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, sync="local", lr=LR)
    x, y = batches()[0]
    try:
        opt.step(_closure(model, x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]))
        results["local"] = "accepted"
    except ValueError as err:
        results["local"] = str(err)
    results["resume"] = _resume(rank, out)
    finish_rank(results, out, rank)


def _mixed_precision(rank: int | None) -> list[torch.Tensor] | str:
    """SAM+GAM for 3 steps with float64 shards computed in float32
    (``MixedPrecisionPolicy(param_dtype=float32)``); ``rank`` None: one process, float32."""
    entry = next(e for e in REGISTRY if e.name == "samgam")
    try:
        model = make_model()
        net = model
        if rank is None:
            net = make_model().float()
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.float32,
                                          reduce_dtype=torch.float32)
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
        opt = entry.build(net.parameters(), torch.optim.SGD, lr=LR, model=net)
        for x, y in batches()[:3]:
            if rank is not None:
                x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
            step(opt, _closure(net, x.float(), y.float()))
        if rank is None:
            return [p.detach().double() for p in net.parameters()]
        assert all(p.grad.dtype == torch.float64 for p in model.parameters())
        return _full(model)
    except Exception:  # noqa: BLE001
        return traceback.format_exc()


def _resume(rank: int, out: str) -> list[torch.Tensor] | str:
    """Train 3 steps, save model and optimizer with torch.distributed.checkpoint, load into a
    fresh sharded model and optimizer, train 2 more: returns the final full parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    entry = next(e for e in REGISTRY if e.name == "fsam")  # has its own state (the EMA)
    data = batches()
    try:
        model, opt = _train(entry, rank, data, stop=3)
        msd, osd = get_state_dict(model, opt.base)
        dcp.save({"model": msd, "optim": osd, "flatlab": opt.state_dict()["flatlab"]},
                 checkpoint_id=f"{out}/ckpt")
        model2 = _shard(make_model())
        opt2 = entry.build(model2.parameters(), torch.optim.SGD, lr=LR, momentum=0.9)
        # dcp.load fills the state dict it is given: one step on other data creates every
        # state entry (base momentum, the method's own state) that the load then overwrites
        _train(entry, rank, batches(), model=model2, opt=opt2, start=4)
        msd2, osd2 = get_state_dict(model2, opt2.base)
        state = {"model": msd2, "optim": osd2, "flatlab": opt2.state_dict()["flatlab"]}
        dcp.load(state, checkpoint_id=f"{out}/ckpt")
        set_state_dict(model2, opt2.base, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        opt2.load_state_dict({**opt2.state_dict(), "flatlab": state["flatlab"]})
        _train(entry, rank, data, model=model2, opt=opt2, start=3)
        return _full(model2)
    except Exception:  # noqa: BLE001
        return traceback.format_exc()


def _one_rank(rank: int, port: int, out: str, backend: str) -> None:
    """Every registry method on an FSDP2 model at world size 1 (one GPU's setting: the shards
    are whole DTensors), ``model=`` given, on the whole batches."""
    device = "cuda" if backend == "nccl" else "cpu"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=1)
    results: dict = {}
    for entry in REGISTRY:
        try:
            model = _shard(make_model().to(device))
            opt = entry.build(model.parameters(), torch.optim.SGD, lr=LR, momentum=0.9,
                              model=model)
            for x, y in batches():
                step(opt, _closure(model, x.to(device), y.to(device)))
            results[entry.name] = [t.cpu() for t in _full(model)]
        except Exception:  # noqa: BLE001 - reported by the test that reads it
            results[entry.name] = traceback.format_exc()
    finish_rank(results, out, rank)


@pytest.mark.parametrize("backend", [
    "gloo",
    pytest.param("nccl", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="NCCL needs a CUDA device")),
])
def test_fsdp2_at_one_rank_equals_one_process(tmp_path, backend):
    """World size 1, as on one GPU: exact HVPs too (they used to see no sharding there)."""
    pytest.importorskip("torch.distributed.fsdp")
    worker = functools.partial(_one_rank, backend=backend)
    (res,) = run_ranks(worker, tmp_path, 1, "spawn" if backend == "nccl" else "fork")
    for entry in REGISTRY:
        assert not isinstance(res[entry.name], str), res[entry.name]
        model, _ = _train(entry, None, batches())
        for a, want in zip(res[entry.name], model.parameters()):
            torch.testing.assert_close(a, want.detach(), rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")
    return run_ranks(_worker, tmp_path_factory.mktemp("fsdp"), WORLD)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_fsdp2_equals_one_process_on_the_whole_batch(rank_results, entry):
    r0, r1 = (res[entry.name] for res in rank_results)
    assert "error" not in r0, r0.get("error")
    assert "error" not in r1, r1.get("error")
    model, opt = _train(entry, None, batches())
    for a, b, want in zip(r0["params"], r1["params"], model.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, want.detach(), rtol=1e-10, atol=1e-12)
    assert r0["steps"] == r1["steps"] == STEPS
    assert r0["skipped"] == r1["skipped"] == 0
    start = make_model()
    assert any(not torch.allclose(a, s.detach()) for a, s in zip(r0["params"],
                                                                  start.parameters()))


def test_exact_hvps_under_fsdp2_need_the_module_and_leave_it_sharded(rank_results):
    for res in rank_results:
        assert "needs model=" in res["no_model"] and "FSDP2" in res["no_model"]
        assert res["no_model_untouched"]
        # every module resharded; the first Linear's own setting (False) and the default
        # (True) of the second put back
        assert res["after_step"] == {"dtensors": True, "settings": [False, True]}
        assert "not parameters of model=" in res["other_model"]
        assert "did not call the backward function it was given" in res["ignores"]
        assert res["ignores_resharded"]


@pytest.mark.parametrize("name", CARRIED)
def test_fsdp2_carried_gradient_and_root_parameters(rank_results, name):
    """A root-owned parameter, a Linear in the root's group, one that keeps its parameters
    after forward, and a carried micro-batch gradient: still the one-process step."""
    a, b = (res[f"carried/{name}"] for res in rank_results)
    assert not isinstance(a, str), a
    want = _carried_run(name, None)
    for x, y, w in zip(a, b, want):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, w, rtol=1e-10, atol=1e-12)


def test_fsdp2_exact_hvps_under_a_mixed_precision_policy(rank_results):
    """float64 shards, float32 compute: the float32 one-process run to float32 round-off."""
    a, b = (res["mixed"] for res in rank_results)
    assert not isinstance(a, str), a
    for x, y, w in zip(a, b, _mixed_precision(None)):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_a_nan_on_one_rank_is_skipped_by_both(rank_results, entry):
    r0, r1 = (res[entry.name] for res in rank_results)
    assert "error" not in r0, r0.get("error")
    assert r0["nan_skipped"] == r1["nan_skipped"] == 1
    data = batches()
    model, opt = _train(entry, None, data, stop=NAN_STEP)
    _train(entry, None, data, model=model, opt=opt, start=NAN_STEP + 1)
    for a, b, want in zip(r0["nan_params"], r1["nan_params"], model.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, want.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["ddp", "plain"])
@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_ddp_and_plain_equal_one_process_on_the_whole_batch(rank_results, entry, kind):
    a, b = (res[f"{kind}/{entry.name}"] for res in rank_results)
    assert not isinstance(a, str), a
    model, _ = _train(entry, None, batches())
    for x, y, want in zip(a, b, model.parameters()):
        assert torch.equal(x, y)
        torch.testing.assert_close(x, want.detach(), rtol=1e-10, atol=1e-12)


def test_local_sync_is_refused_under_fsdp2(rank_results):
    for res in rank_results:
        assert "sync='local'" in res["local"] and "FSDP2" in res["local"]


def test_dcp_checkpoint_resumes_bit_for_bit(rank_results):
    a, b = (res["resume"] for res in rank_results)
    assert not isinstance(a, str), a
    want = rank_results[0]["fsam"]["params"]  # the same 5 steps without the round trip
    for x, y, w in zip(a, b, want):
        assert torch.equal(x, y)
        assert torch.equal(x, w)
