"""Laboratory runs at two gloo ranks equal the run in one process; rank 0 alone writes.

A float64 toy experiment (three phases: SGD with momentum on minibatches of 7, split 4/3
over the ranks; SAM, which averages its passes itself; SignSGD on the full batch) is launched
at 2 ranks the way torchrun starts it (RANK/WORLD_SIZE in the environment), and in one
process. The metrics must agree to float64 round-off, rank 1's in-memory records must be
rank 0's, one folder must exist, and a run that crashed at 2 ranks must resume bit for bit.

The SGD phase also runs the measuring callbacks (curvature, two sharpness measures,
activation sparsity) and the experiments' end-of-run measurements: at 2 ranks each rank
measures half the rows, and the values must be the one process's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from pydantic import Field

from flatlab.experiments import ExperimentConfig, _registry, launch
from flatlab.train import (
    ActivationSparsity,
    Callback,
    Checkpoint,
    CurvatureMonitor,
    Evaluate,
    Run,
    Sharpness,
    build_optimizer,
    fit,
)
from flatlab.train.parallel import DataParallel, _bounds, measured
from tests.optim.test_distributed import finish_rank, run_ranks

WORLD = 2
TIMING = ("step_time", "step_cpu_time")
MEASURED = ("lambda_max", "edge_gd", "sharpness_worst_case", "sharpness_trace", "act_sparsity",
            "act_sparsity/1")
_END: dict = {}  # the toy's end-of-run measurements, read by the worker after launch


class Config(ExperimentConfig):
    steps: int = Field(6, ge=1, description="steps per phase")


class _Crash(Callback):
    def __init__(self, at: int) -> None:
        super().__init__(every=1)
        self.at = at

    def on_step(self, state):
        if state.step == self.at:
            raise RuntimeError("simulated crash")
        return None


class _Rows(Callback):
    """Logs how many rows of the training set this rank measures."""

    def on_step(self, state):
        part, across = state.measured(None)
        return {"rows": float(sum(y.shape[0] for _, y in part)), "across": float(across)}


def _toy(cfg: Config, run: Run) -> dict:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    results = {}
    for name, batch in (("sgd", 7), ("sam", 7), ("signsgd", None)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 2)).double()
        kw = {"momentum": 0.9} if name == "sgd" else {"rho": 0.1} if name == "sam" else {}
        opt = build_optimizer(name, model.parameters(), lr=0.05, **kw)
        callbacks = [Evaluate({"train": (x, y)}, every=2), Checkpoint(every=2)]
        if name == "sgd":
            callbacks += [CurvatureMonitor(every=3), Sharpness(every=3, rho=0.1, steps=3),
                          Sharpness(every=3, measure="trace", probes=8),
                          ActivationSparsity(every=3), _Rows(every=3)]
        if os.environ.get("TOY_CRASH_AT") and name == "sam":  # not in the saved config
            callbacks.append(_Crash(int(os.environ["TOY_CRASH_AT"])))
        res = fit(model, opt, (x, y), steps=cfg.steps, batch_size=batch, run=run, tag=name,
                  callbacks=callbacks, progress=False, seed=cfg.seed)
        results[name] = res.last("loss")
        if name == "sgd":
            _END.clear()
            _END.update(_end_measures(model, x, y, run))
    run.add_section("Numbers", "Final losses.", table=[results])
    return results


def _end_measures(model, x, y, run: Run) -> dict:
    from types import SimpleNamespace

    from flatlab.experiments import dg, flatness, sparsity

    cfg = SimpleNamespace(measure_examples=30, trace_probes=8, sharpness_steps=3,
                          sharpness_rho=0.1, adaptive_rho=0.5, sharpness_examples=15)
    splits = SimpleNamespace(train=(x[:30], y[:30]), test=(x[30:], y[30:]))
    out = flatness.measure(model, splits, cfg, run.parallel)
    domains = {"a": (x[:20], y[:20]), "b": (x[20:], y[20:])}
    sharp = dg.measure_sharpness(model, domains, cfg, run.parallel)
    out.update({f"dg_{k}": v for k, v in sharp.items() if k != "per_domain"})
    out.update({f"dg_{k}": v for k, v in sharp["per_domain"].items()})
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(),
                              torch.nn.Linear(8, 2)).double()
    trained = sparsity._train(run, "sparsity", net, splits, seed=0, lr=0.05, batch=7, epochs=1,
                              sharpness=True)  # sparsity, lambda_max and AF at the end
    out.update({f"sparsity_{k}": trained[k] for k in ("final_mean", "delta_mean", "lambda_max",
                                                      "af", "af_gap", "history_final")})
    return out


@pytest.fixture(scope="module")
def toy():
    _registry.discover()
    saved = dict(_registry._REGISTRY)
    _registry.register("parallel_toy", Config, help="float64 toy for data-parallel runs")(_toy)
    yield
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(saved)


def _records(run: Run) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in run.metrics()]


def _worker(rank: int, port: int, out: str) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        root = Path(out)
        fresh = launch("parallel_toy", out=root / "fresh", report=False)
        end = dict(_END)
        crashed = None
        os.environ["TOY_CRASH_AT"] = "3"
        try:
            launch("parallel_toy", out=root / "crashed", report=False)
        except RuntimeError:
            dist.barrier()
            crashed = next((root / "crashed").iterdir())
        del os.environ["TOY_CRASH_AT"]
        resumed = launch(resume=crashed, report=False)
        finish_rank({"fresh": _records(fresh), "resumed": _records(resumed),
                     "writes": (fresh.writes, resumed.writes), "path": str(fresh.path), "end": end},
                    out, rank)
    except Exception:
        traceback.print_exc()
        raise


@pytest.fixture(scope="module")
def ranks(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel_runs")
    return out, run_ranks(_worker, out, WORLD)


@pytest.fixture(scope="module")
def alone(toy, tmp_path_factory):
    records = _records(launch("parallel_toy", out=tmp_path_factory.mktemp("alone"),
                              report=False))
    return records, dict(_END)


def test_two_ranks_equal_one_process(ranks, alone):
    _, (r0, _) = ranks
    fresh, alone = r0["fresh"], alone[0]
    assert [(r["tag"], r["step"]) for r in fresh] == [(r["tag"], r["step"]) for r in alone]
    for got, want in zip(fresh, alone):
        for key in ("loss", "train_loss", "train_acc"):
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-10, abs=1e-12), (got, key)


def test_measurements_are_sharded_and_equal_the_one_process_values(ranks, alone):
    _, (r0, r1) = ranks
    records, end = alone
    measured_steps = [r for r in records if "lambda_max" in r]
    assert [r["step"] for r in measured_steps] == [0, 3, 6]  # of the SGD phase
    assert all(r["rows"] == 40 and r["across"] == 0 for r in measured_steps)
    got = [r for r in r0["fresh"] if "lambda_max" in r]
    assert all(r["rows"] == 20 and r["across"] == 1 for r in got)  # each rank half the rows
    for g, want in zip(got, measured_steps):
        assert set(MEASURED) <= set(want)
        for key in MEASURED:
            assert g[key] == pytest.approx(want[key], rel=1e-8, abs=1e-10), key
    assert set(r0["end"]) == set(end) and len(end) > 12
    for key, want in end.items():
        for res in (r0, r1):  # every rank gets the full data's value
            assert res["end"][key] == pytest.approx(want, rel=1e-8, abs=1e-10), key


def test_only_rank_0_writes_and_rank_1_follows_its_records(ranks):
    out, (r0, r1) = ranks
    assert r0["writes"] == (True, True) and r1["writes"] == (False, False)
    assert r0["path"] == r1["path"]
    assert len(list((out / "fresh").iterdir())) == 1  # one run folder
    assert r1["fresh"] == r0["fresh"]  # the follower's in-memory records are rank 0's
    written = _records(Run.open(r0["path"]))
    assert written == r0["fresh"]  # each record once in metrics.jsonl
    folder = Path(r0["path"])
    assert (folder / "done").exists() and (folder / "sections.json").exists()
    assert not list(folder.rglob(".*tmp*"))


def test_a_run_that_crashed_at_two_ranks_resumes_bit_for_bit(ranks):
    _, (r0, r1) = ranks
    assert r0["resumed"] == r0["fresh"]
    assert r1["resumed"] == r0["fresh"]


def test_parts_of_a_minibatch_cover_it_as_tensor_split_does():
    for n in (7, 8, 40):
        for world in (1, 2, 3):
            want = [len(p) for p in torch.tensor_split(torch.arange(n), world)]
            got = [hi - lo for lo, hi in (_bounds(n, world, r) for r in range(world))]
            assert got == want and _bounds(n, world, world - 1)[1] == n


def _fake_group(rank: int, world: int) -> DataParallel:
    par = object.__new__(DataParallel)
    par.rank, par.world = rank, world
    return par


def test_a_shard_is_this_ranks_rows_of_each_pair_or_none_when_it_cannot_be_split():
    x, y = torch.arange(14.0).view(7, 2), torch.arange(7)
    parts = [_fake_group(r, 2).shard((x, y)) for r in range(2)]
    assert [p[1].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6]]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    pairs = [(x, y), (x[:3], y[:3])]
    got = _fake_group(1, 3).shard(pairs)
    assert isinstance(got, list) and [p[1].tolist() for p in got] == [[3, 4], [1]]
    assert _fake_group(0, 4).shard(pairs) is None  # a pair of 3 rows cannot feed 4 ranks
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    assert _fake_group(0, 2).shard(loader) is None
    assert measured(loader, _fake_group(0, 2)) == (loader, False)
    data = (x, y)
    assert measured(data, None) == (data, False)
    part, across = measured(data, _fake_group(1, 2))
    assert across is True and part[1].tolist() == [4, 5, 6]


def test_a_follower_writes_nothing(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Run.create(tmp_path, "x", {"a": 1})
    run.log(tag="t", step=0, loss=1.0)
    before = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    follower = Run.follow(run.path)
    follower.log(tag="t", step=1, loss=0.5)
    follower.add_section("S", "text")
    follower.savefig(plt.figure(), "fig")
    follower.mark_done({"x": 1})
    assert [r["step"] for r in follower.metrics("t")] == [0, 1]
    assert follower.sections()[0]["title"] == "S"
    after = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()}
    assert after == before


def test_fit_distributed_without_a_group_is_refused():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs an initialized process group"):
        fit(model, torch.optim.SGD(model.parameters(), lr=0.1),
            (torch.randn(4, 2), torch.zeros(4, dtype=torch.long)), steps=1, progress=False,
            distributed=True)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "flatlab", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def test_nproc_with_a_bad_setting_exits_2_before_starting_anything(tmp_path):
    out = _cli("run", "demo", "--nproc", "2", "--set", "lr=-1", "--out", "runs", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and "lr" in out.stderr
    assert "torch.distributed" not in out.stderr and not (tmp_path / "runs").exists()
    out = _cli("run", "demo", "--nproc", "0", cwd=tmp_path)
    assert out.returncode == 2 and "--nproc must be >= 1, got 0" in out.stderr


def test_flatlab_run_nproc_2_writes_one_folder_and_one_report(tmp_path):
    out = _cli("run", "demo", "--quick", "--nproc", "2", "--set", "steps=8", "--set", "n=300",
               "--set", "optimizers=[sgd,sam]", "--out", "runs", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stdout.count("run folder:") == 1  # rank 0 alone prints
    (folder,) = (tmp_path / "runs").iterdir()
    assert (folder / "done").exists() and (folder / "report.html").exists()
    tags = [r["tag"] for r in Run.open(folder).metrics()]
    assert tags.count("sgd") > 0 and tags.count("sam") == tags.count("sgd")
