"""`flatlab run flatness`: the quick study end to end, the table, factories, and compare."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from flatlab.experiments import ConfigError, launch
from flatlab.experiments.flatness import load_factory, summary_rows
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
                                            "measure/mnist1d_mlp/gam/seed0"}
    by_opt = {r["tag"].split("/")[2]: r for r in measures}
    assert by_opt["sgd"]["passes_per_step"] == 1.0
    assert by_opt["gam"]["passes_per_step"] == 4.0  # accelerated GAM: 4 passes
    for r in measures:
        assert r["lambda_max"] > 0 and r["trace"] > 0 and r["grad_norm"] >= 0
        assert 0 <= r["test_acc"] <= 1 and r["sharpness_worst"] >= 0
    html = (run.path / "report.html").read_text()
    assert "Results (mean ± s.e. over seeds)" in html and "gam" in html
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
