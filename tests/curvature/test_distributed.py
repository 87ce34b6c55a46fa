"""Data-parallel curvature: two gloo ranks with unequal shards equal one process on all data.

Each rank holds its own shard of a 20-example float64 dataset (rank 0: batches of 4 and 3,
rank 1: batches of 5, 5 and 3) and measures with ``distributed=True``. Every measurement must
equal the single-process one on the concatenated data, on both ranks, and the ranks must
agree bit for bit (the probes are seeded identically, and an all-reduce hands every rank the
same sum). Also: a DDP-wrapped model, the cached and the streamed product paths, and the
errors for ranks whose parameters or start vectors differ, for an FSDP2 model and for
``distributed=True`` without a process group.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
from torch import nn

from flatlab.curvature import (
    average_sharpness,
    first_order_flatness,
    ggn_operator,
    gradient_norm,
    hessian_operator,
    hessian_trace,
    loss_landscape,
    residual_operator,
    spectral_density,
    top_eigenvalues,
    worst_case_sharpness,
)
from flatlab.sparsity import activation_sparsity, augmented_flatness
from tests.optim.test_distributed import finish_rank, run_ranks

WORLD = 2
SHARDS = ([4, 3], [5, 5, 3])  # unequal: 7 and 13 examples
RHO = 0.05
loss_fn = nn.functional.cross_entropy


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


class _TanhFirst(nn.Module):
    """A tanh network whose first layer is a hand-written ``F.linear``: not an exact block."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.w = nn.Parameter(torch.randn(4, 5, dtype=torch.float64) / 2)
        self.b = nn.Parameter(torch.zeros(4, dtype=torch.float64))
        self.out = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.out(torch.tanh(nn.functional.linear(x, self.w, self.b)))


def all_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = sum(map(sum, SHARDS))
    return (torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def shard(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = all_data()
    start = sum(SHARDS[0]) if rank == 1 else 0
    out = []
    for n in SHARDS[rank]:
        out.append((x[start:start + n], y[start:start + n]))
        start += n
    return out


def measure(model: nn.Module, data, **dp) -> dict:
    """Every instrument on ``data``; ``dp`` is ``{}`` or ``{"distributed": True}``."""
    q = dict(progress=False)
    out = {}
    eig = top_eigenvalues(model, loss_fn, data, k=3, tol=1e-10, **q, **dp)
    assert eig.start == "gradient"  # from the gradient reduced over the ranks
    out["eig"] = eig.values
    out["eig_power"] = top_eigenvalues(model, loss_fn, data, k=1, method="power", tol=1e-10,
                                       max_matvecs=400, **q, **dp).values
    out["eig_block"] = top_eigenvalues(model, loss_fn, data, k=2, block_size=2, tol=1e-10,
                                       **q, **dp).values
    for path in ("cached", "streamed"):
        op = hessian_operator(model, loss_fn, data, path=path, **dp)
        out[f"dense_{path}"] = op.to_dense()
        out[f"path_{path}"] = op.path
        out[f"gradient_{path}"] = op.gradient()
    out["trace"] = torch.tensor(hessian_trace(model, loss_fn, data, probes=12, method="xtrace",
                                              **q, **dp).value)
    torch.manual_seed(3)  # "auto" on a tanh MLP: its Linear blocks exactly, on every rank
    tanh = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    auto = hessian_trace(tanh, loss_fn, data, probes=12, **q, **dp)
    assert auto.method == "gauss_newton" and auto.stderr == 0.0
    out["trace_auto"] = torch.tensor(auto.value)
    out["trace_hutch"] = torch.tensor(hessian_trace(model, loss_fn, data, probes=12,
                                                    method="hutchinson", **q, **dp).value)
    out["trace_gn"] = torch.tensor(hessian_trace(model, loss_fn, data, probes=12,
                                                 method="gauss_newton", **q, **dp).value)
    # a residual the Gauss-Newton route estimates (24 coordinates > 2 x 6 products): the
    # split Gauss-Newton trace is reduced over the ranks and its pilot decides alike on both
    out["trace_gn_residual"] = torch.tensor(hessian_trace(
        _TanhFirst(), loss_fn, data, probes=6, method="gauss_newton", **q, **dp).value)
    out["ggn"] = ggn_operator(model, loss_fn, data, **dp).to_dense()
    out["residual"] = residual_operator(_TanhFirst(), loss_fn, data, **dp).to_dense()
    out["density"] = spectral_density(model, loss_fn, data, steps=8, runs=2, **q, **dp).density
    out["worst"] = torch.tensor([
        worst_case_sharpness(model, loss_fn, data, RHO, steps=4, **q, **dp).value,
        worst_case_sharpness(model, loss_fn, data, RHO, steps=3, adaptive=True, norm="linf",
                             **q, **dp).value,
        worst_case_sharpness(model, loss_fn, data, RHO, steps=3, batchwise=True, **q, **dp).value,
        average_sharpness(model, loss_fn, data, RHO, samples=4, **q, **dp).value,
        first_order_flatness(model, loss_fn, data, RHO, steps=3, **q, **dp).value,
        gradient_norm(model, loss_fn, data, **dp).value,
    ])
    out["landscape"] = loss_landscape(model, loss_fn, data, points=5, **dp).losses
    sp = activation_sparsity(model, data, **dp)
    out["sparsity"] = torch.tensor([sp.mean, sp.per_layer["1"], sp.zero_output["1"],
                                    sp.entries["1"], sp.n_examples], dtype=torch.float64)
    af = augmented_flatness(model, loss_fn, data, **dp)
    out["augmented_flatness"] = torch.tensor([af.value["0"], af.density["0"], af.active_mean["0"],
                                              af.entries["0"], af.identity_gap["0"]],
                                             dtype=torch.float64)
    return out


def _errors(rank: int, model: nn.Module, data) -> dict:
    """The messages of refused measurements (every rank must raise, none may hang)."""
    out = {}
    n = sum(p.numel() for p in model.parameters())
    start = torch.ones(n, dtype=torch.float64)
    start[0] += rank  # a direction that differs across the ranks
    try:
        top_eigenvalues(model, loss_fn, data, init=start, progress=False, distributed=True)
    except ValueError as e:
        out["init"] = str(e)
    other = make_model()
    if rank == 1:
        with torch.no_grad():
            other[0].weight[0, 0] += 1.0
    try:
        hessian_operator(other, loss_fn, data, distributed=True)
    except ValueError as e:
        out["params"] = str(e)
    # a wall-clock budget spent on rank 1 only: both ranks must stop together
    res = top_eigenvalues(model, loss_fn, data, k=2, tol=1e-14, progress=False,
                          max_seconds=1e-9 if rank == 1 else 600.0, distributed=True)
    out["budget"] = (res.n_matvecs, res.converged)
    from torch.distributed.fsdp import fully_shard

    try:
        hessian_operator(fully_shard(make_model()), loss_fn, data, distributed=True)
    except TypeError as e:
        out["fsdp"] = str(e)
    return out


def _scaled(model: nn.Module) -> nn.Module:
    """The weights a training run has moved (here: scaled by 1.1, in place)."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    return model


def _fsdp_replica(data) -> torch.Tensor:
    """docs/distributed.md's recipe for an FSDP2 model: its full state dict loaded into a plain
    replica (built from other weights, so the load must carry them), measured distributed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    sharded = fully_shard(make_model())
    _scaled(sharded)  # on the DTensor shards
    full = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))
    torch.manual_seed(99)
    replica = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    replica.load_state_dict(full)
    return top_eigenvalues(replica, loss_fn, data, k=3, tol=1e-10, progress=False,
                           distributed=True).values


def _tokens(rank: int) -> tuple[nn.Module, list, list]:
    """A token model (h of shape (B, T, d)) and each rank's batches of 4 positions."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 4, 3, generator=g) for n in (2, 3, 4)]
    mine = xs[:1] if rank == 0 else xs[1:]
    return net, [(x, torch.zeros(len(x))) for x in mine], [(x, torch.zeros(len(x))) for x in xs]


def _positions(rank: int) -> dict:
    """Per-position sparsity through the probe's own ``result(distributed=True)``."""
    from flatlab.sparsity import SparsityProbe

    net, mine, _ = _tokens(rank)
    with SparsityProbe(net, per_position=True) as probe, torch.no_grad():
        for x, _ in mine:
            net(x)
    return probe.result(distributed=True).per_position


def _worker(rank: int, port: int, out: str) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD)
        model, data = make_model(), shard(rank)
        res = measure(model, data, distributed=True)
        ddp = nn.parallel.DistributedDataParallel(make_model())
        res["ddp_eig"] = top_eigenvalues(ddp, loss_fn, data, k=3, tol=1e-10, progress=False,
                                         distributed=True).values
        res["ddp_sparsity"] = torch.tensor(activation_sparsity(ddp, data, distributed=True).mean,
                                           dtype=torch.float64)
        res["fsdp_replica_eig"] = _fsdp_replica(data)
        res["errors"] = _errors(rank, model, data)
        res["positions"] = _positions(rank)
        finish_rank(res, out, rank)
    except Exception:
        traceback.print_exc()
        raise


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(_worker, tmp_path_factory.mktemp("dp_curvature"), WORLD)


@pytest.fixture(scope="module")
def single():
    return measure(make_model(), list(zip(*[t.split([4, 3, 5, 5, 3]) for t in all_data()])))


KEYS = ["eig", "eig_power", "eig_block", "dense_cached", "dense_streamed", "gradient_cached",
        "gradient_streamed", "trace",
        "trace_hutch", "trace_gn", "trace_gn_residual", "trace_auto", "ggn", "residual",
        "density", "worst",
        "landscape", "sparsity", "augmented_flatness"]


@pytest.mark.parametrize("key", KEYS)
def test_equals_one_process_on_all_data(ranks, single, key):
    for res in ranks:
        torch.testing.assert_close(res[key], single[key], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("key", KEYS)
def test_ranks_agree_bit_for_bit(ranks, key):
    assert torch.equal(ranks[0][key], ranks[1][key])


def test_the_dense_hessian_is_the_full_data_one(ranks):
    """Against torch.autograd.functional.hessian of the mean loss over all 20 examples."""
    model, (x, y) = make_model(), all_data()
    params = list(model.parameters())
    shapes = [p.shape for p in params]

    def f(flat):
        ws, start = [], 0
        for s in shapes:
            ws.append(flat[start:start + s.numel()].view(s))
            start += s.numel()
        h = torch.relu(x @ ws[0].T + ws[1])
        return loss_fn(h @ ws[2].T + ws[3], y)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    want = torch.autograd.functional.hessian(f, flat)
    for res in ranks:
        assert res["path_cached"] == "cached" and res["path_streamed"] == "streamed"
        torch.testing.assert_close(res["dense_cached"], want, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(res["dense_streamed"], want, rtol=1e-9, atol=1e-12)


def test_a_ddp_wrapped_model_is_measured_through_its_module(ranks, single):
    for res in ranks:
        torch.testing.assert_close(res["ddp_eig"], single["eig"], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(res["ddp_sparsity"], single["sparsity"][0])


def test_an_fsdp2_models_full_state_dict_is_measured_on_a_replica(ranks):
    want = top_eigenvalues(_scaled(make_model()), loss_fn, all_data(), k=3, tol=1e-10,
                           progress=False).values
    assert not torch.allclose(want, top_eigenvalues(make_model(), loss_fn, all_data(), k=3,
                                                    tol=1e-10, progress=False).values)
    for res in ranks:
        torch.testing.assert_close(res["fsdp_replica_eig"], want, rtol=1e-9, atol=1e-10)


def test_ranks_whose_start_vectors_differ_are_refused(ranks):
    for res in ranks:
        msg = res["errors"]["init"]
        assert "the first vector multiplied must be the same on every rank" in msg
        assert "rank 1" in msg and "same init and seed" in msg


def test_ranks_whose_parameters_differ_are_refused(ranks):
    for res in ranks:
        msg = res["errors"]["params"]
        assert "the measured parameters must be the same on every rank" in msg
        assert "rank 1" in msg and "broadcast the model" in msg


def test_a_time_budget_spent_on_one_rank_stops_both(ranks):
    budgets = [res["errors"]["budget"] for res in ranks]
    assert budgets[0] == budgets[1]
    assert budgets[0][1] is False  # stopped by the budget, not converged


def test_distributed_without_a_process_group_is_refused():
    x, y = all_data()
    with pytest.raises(ValueError, match="needs an initialized process group"):
        top_eigenvalues(make_model(), loss_fn, (x, y), distributed=True, progress=False)
    with pytest.raises(TypeError, match="distributed must be True, False or"):
        hessian_trace(make_model(), loss_fn, (x, y), distributed="yes", progress=False)


def test_distributed_with_an_operator_is_refused():
    with pytest.raises(ValueError, match="distributed applies to a model"):
        top_eigenvalues(torch.eye(3), k=1, distributed=True)


def test_a_sharded_fsdp2_model_is_refused_with_what_to_do(ranks):
    for res in ranks:
        msg = res["errors"]["fsdp"]
        assert "sharded (FSDP2 / DTensor) parameters" in msg and "full_state_dict" in msg


def test_per_position_counts_are_summed_over_the_ranks(ranks):
    from flatlab.sparsity import SparsityProbe

    net, _, everything = _tokens(0)
    with SparsityProbe(net, per_position=True) as probe, torch.no_grad():
        for x, _ in everything:
            net(x)
    want = probe.result().per_position
    for res in ranks:
        assert res["positions"] == want
