"""`flatlab run flatness`: the quick study end to end, the table, factories, and compare."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

import pytest

from flatlab.experiments import ConfigError, launch
from flatlab.experiments.flatness import (
    claim_rows,
    claim_verdicts,
    load_factory,
    summary_rows,
    val_change_last20,
)
from flatlab.report.summary import mean_se, summarize


def test_mean_se_matches_hand_computation() -> None:
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    # sample variance = ((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 2 = 7/3
    assert se == pytest.approx((7 / 3 / 3) ** 0.5)
    assert mean_se([5.0]) == (5.0, 0.0)
    assert mean_se([float("nan"), 2.0]) == (2.0, 0.0)


def test_summary_groups_measure_records_by_task_and_optimizer() -> None:
    recs = [
        {"tag": "measure/t/sgd/seed0", "lambda_max": 10.0, "test_acc": 0.5},
        {"tag": "measure/t/sgd/seed1", "lambda_max": 20.0, "test_acc": 0.7},
        {"tag": "measure/t/gam/seed0", "lambda_max": 5.0, "test_acc": 0.6},
        {"tag": "t/sgd/lr0", "loss": 1.0},
    ]
    rows = {r["optimizer"]: r for r in summary_rows(recs)}
    assert set(rows) == {"sgd", "gam"}
    assert rows["sgd"]["seeds"] == 2 and rows["sgd"]["λ_max"].startswith("15 ± 5")
    assert rows["gam"]["test acc"].startswith("0.6 ± 0")
    generic = summarize(recs)
    assert {r["optimizer"] for r in generic} == {"sgd", "gam"}


@pytest.mark.parametrize(
    ("spec", "match"),
    [("nocolon", "package.module:function"), ("no_such_mod_xyz:f", "cannot import"),
     ("math:not_there", "no callable")],
)
def test_bad_factory_spec_is_a_config_error(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_factory(spec, "model")


def test_quick_study_end_to_end_and_compare_rebuilds_table(tmp_path: Path) -> None:
    run = launch("flatness", quick=True, out=tmp_path,
                 overrides=["tasks=[mnist1d_mlp]", "optimizers=[sgd,gam]"])
    recs = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    measures = [r for r in recs if r.get("tag", "").startswith("measure/")]
    assert {r["tag"] for r in measures} == {"measure/mnist1d_mlp/sgd/seed0",
                                            "measure/mnist1d_mlp/gam/seed0",
                                            "measure/mnist1d_mlp/sgd@gam/seed0"}
    by_opt = {r["tag"].split("/")[2]: r for r in measures}
    assert by_opt["sgd"]["passes_per_step"] == 1.0
    assert by_opt["gam"]["passes_per_step"] == 4.0  # accelerated GAM: 4 passes
    # the equal-CPU-time baseline: SGD for GAM's CPU time, i.e. more steps than GAM
    assert by_opt["sgd@gam"]["steps"] > by_opt["gam"]["steps"] == 30
    for r in measures:
        assert r["lambda_max"] > 0 and r["trace"] > 0 and r["grad_norm"] >= 0
        assert 0 <= r["test_acc"] <= 1 and r["sharpness_worst"] >= 0
    html = (run.path / "report.html").read_text()
    assert "Results (mean ± s.e. over seeds)" in html and "gam" in html
    assert "Baselines against the published reference" in html and "mnist1d README" in html
    assert (run.path / "plots" / "accuracy_vs_lambda_max.png").exists()

    from typer.testing import CliRunner

    from flatlab.cli import app
    from flatlab.report import experiment_summaries

    table = {r["optimizer"]: r for r in experiment_summaries([run.path])}
    expected = {r["optimizer"]: {"run": run.path.name, **r} for r in summary_rows(measures)}
    assert table == expected
    result = CliRunner().invoke(app, ["compare", str(run.path), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    assert expected["gam"]["λ_max"] in result.output
    assert "Results tables" in (tmp_path / "cmp" / "compare.html").read_text()


def test_user_model_and_data_factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_study.py").write_text(textwrap.dedent("""
        import torch
        from flatlab.data import digits

        def data():
            return digits(size=8, seed=1)

        def model(input_shape, num_classes):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = launch("flatness", quick=True, out=tmp_path / "runs",
                 overrides=["model=my_study:model", "data=my_study:data", "optimizers=[sgd]"])
    tags = [json.loads(x)["tag"] for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert "measure/custom/sgd/seed0" in tags
    sys.modules.pop("my_study", None)


def test_model_without_data_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="together"):
        launch("flatness", quick=True, out=tmp_path, overrides=["model=math:sqrt"])


def _records(task: str, opt: str, key: str, values: list[float]) -> list[dict]:
    return [{"tag": f"measure/{task}/{opt}/seed{i}", key: v} for i, v in enumerate(values)]


def test_claims_pair_seeds_and_render_verdicts() -> None:
    recs = (_records("t", "sgd", "lambda_max", [8.0, 7.6, 8.6, 7.9, 8.1])
            + _records("t", "gam", "lambda_max", [4.1, 3.5, 4.4, 4.0, 4.3])
            + _records("t", "sgd", "test_acc", [0.60, 0.62, 0.61, 0.63, 0.60])
            + _records("t", "gam", "test_acc", [0.61, 0.61, 0.62, 0.62, 0.61]))
    verdicts = {v.gate.claim: v for _, v in claim_verdicts(recs)}
    lam = verdicts["GAM(SGD) lowers λ_max vs SGD"]
    assert lam.passed and lam.interval.n == 5
    assert lam.interval.estimate == pytest.approx(-3.98)
    acc = verdicts["GAM(SGD) raises test accuracy vs SGD"]
    # differences in points: +1, -1, +1, -1, +1 -> mean 0.2, CI straddles 0
    assert acc.interval.estimate == pytest.approx(0.2) and not acc.passed
    assert acc.cell().startswith("not shown at this scale")
    rows = claim_rows(recs)
    assert {r["claim"] for r in rows} == set(verdicts)  # claims with missing optimizers skipped


def test_val_change_last20() -> None:
    hist = [{"step": s, "val_acc": a} for s, a in [(0, 0.1), (40, 0.5), (80, 0.6), (100, 0.65)]]
    assert val_change_last20(hist) == pytest.approx(0.05)
    assert math.isnan(val_change_last20([{"step": 1, "loss": 1.0}]))


def _write_cifar(root: Path, n: int, classes: int) -> None:
    import pickle

    import numpy as np

    rng = np.random.default_rng(0)

    def batch(k: int, key: str) -> dict:
        return {b"data": rng.integers(0, 256, (k, 3072), dtype=np.uint8),
                key.encode(): rng.integers(0, classes, k).tolist()}

    if classes == 10:
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for i in range(1, 6):
            (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n, "labels")))
        (d / "test_batch").write_bytes(pickle.dumps(batch(n, "labels")))
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True)
        for name in ("train", "test"):
            b = batch(5 * n, "fine_labels")
            b[b"coarse_labels"] = [y % 20 for y in b[b"fine_labels"]]
            (d / name).write_bytes(pickle.dumps(b))


@pytest.mark.parametrize(("task", "classes", "opts"),
                         [("cifar10_resnet18", 10, ["sgd", "sam"]), ("cifar100_wrn", 100, ["sgd"])])
def test_cifar_tasks_end_to_end_on_a_tiny_fixture(tmp_path: Path, task: str, classes: int,
                                                   opts: list[str]) -> None:
    _write_cifar(tmp_path / "data", n=8, classes=classes)
    run = launch("flatness", quick=True, out=tmp_path / "runs",
                 overrides=[f"tasks=[{task}]", f"data_dir={tmp_path / 'data'}",
                            f"optimizers=[{','.join(opts)}]", "equal_cpu=[]", "batch_size=16"])
    recs = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines()]
    tags = {r["tag"] for r in recs if r.get("tag", "").startswith("measure/")}
    assert tags == {f"measure/{task}/{o}/seed0" for o in opts}
    assert (run.path / "done").exists()


def test_cifar_task_needs_data_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data_dir"):
        launch("flatness", quick=True, out=tmp_path, overrides=["tasks=[cifar10_resnet18]"])


def test_cifar_models_are_the_papers_sizes() -> None:
    from flatlab.models import build

    def count(**kw) -> int:
        return sum(p.numel() for p in build("resnet", (3, 32, 32), 10, **kw).parameters())

    assert count(blocks=(2, 2, 2, 2), width=64) == 11_173_962  # CIFAR ResNet-18
    assert count(depth=8, width=4) == count(blocks=(1, 1, 1), width=4)  # depth = 6n + 2


def _task_run(root: Path, task: str, shift: float, seeds: int = 4):
    """A flatness run folder holding only measurements: SGD and GAM on ``task``, GAM's
    λ_max lower by ``shift`` (with seed noise) and its accuracy higher."""
    from flatlab.train import Run

    run = Run.create(root, "flatness", {"tasks": [task]})
    for s in range(seeds):
        noise = 0.1 * ((s * 7) % 3 - 1)
        run.log(step=30, tag=f"measure/{task}/sgd/seed{s}", lambda_max=10.0 + noise,
                test_acc=0.60 + 0.01 * noise)
        run.log(step=30, tag=f"measure/{task}/gam/seed{s}", lambda_max=10.0 - shift + 2 * noise,
                test_acc=0.63 + 0.01 * s)
    return run


def test_compare_joins_a_study_split_per_task_into_one_verdict_table(tmp_path: Path) -> None:
    """`flatlab run flatness --set tasks=[t]` per task, then `flatlab compare` on the parts:
    one verdict table over the joined measurements, as the whole study would report it."""
    from typer.testing import CliRunner

    from flatlab.cli import app
    from flatlab.report import compare_runs, joined_tables

    mlp, cnn = _task_run(tmp_path, "mnist1d_mlp", 3.0), _task_run(tmp_path, "mnist1d_cnn", 1.0)
    rows, notes = joined_tables([mlp.path, cnn.path])
    assert notes == []
    expected = claim_rows(mlp.metrics() + cnn.metrics())
    assert [{k: v for k, v in r.items() if k not in ("experiment", "runs")} for r in rows] == \
        expected
    assert {r["task"] for r in rows} == {"mnist1d_mlp", "mnist1d_cnn"}
    assert all(r["experiment"] == "flatness" and r["runs"] == 2 for r in rows)
    lam = next(r for r in rows if r["task"] == "mnist1d_mlp" and "λ_max" in r["claim"])
    assert lam["seeds"] == 4 and "-3.0" in lam["paired difference (95% t CI)"]
    result = compare_runs([mlp.path, cnn.path], tmp_path / "cmp")
    assert result.joined == rows
    assert "Over the runs joined" in (tmp_path / "cmp" / "compare.md").read_text()
    out = CliRunner().invoke(app, ["compare", str(mlp.path), str(cnn.path), "--out",
                                   str(tmp_path / "cmp2")])
    assert out.exit_code == 0, out.output
    assert "over the runs joined:" in out.output and lam["claim"] in out.output
    # the same task measured in two runs is not joined (it would mix two runs' seeds)
    again = _task_run(tmp_path, "mnist1d_mlp", 2.0)
    rows, notes = joined_tables([mlp.path, again.path])
    assert rows == [] and len(notes) == 1
    assert "'measure/mnist1d_mlp/sgd/seed0' is measured in both" in notes[0]
