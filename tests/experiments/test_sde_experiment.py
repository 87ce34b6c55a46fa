"""``flatlab run sde --quick`` end to end: run folder, figures, results table."""

from __future__ import annotations

import json

import pytest
import torch

from flatlab.experiments import get, launch


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_sde_quick_end_to_end(tmp_path, restore_threads):
    run = launch("sde", quick=True, out=tmp_path,
                 overrides=["sigmas=[1.0,4.0]", "nus=[1.0]", "adamw_sigmas=[1.0,16.0]",
                            "adamw_free_sigmas=[1.0,4.0]", "scaling_deltas=[4]",
                            "steps=400", "scaling_steps=800", "network_steps=10"])
    assert run.done
    plots = {p.stem for p in (run.path / "plots").glob("*.png")}
    assert {"trajectories", "noise_scaling", "heavy_tails", "adamw_weight_decay",
            "scaling_rule", "adamw_sde", "network", "scaling_rule_real_noise"} <= plots
    report = (run.path / "report.md").read_text()
    for title in ("Results", "T1: SignSGD against its SDE", "T5: scaling rule",
                  "Earlier SDEs: Malladi et al. 2022 vs Compagnoni et al. 2025"):
        assert title in report
    real = next(s for s in run.sections()
                if s["title"] == "T5 with real noise: the scaling rule on a network")
    assert "Signal share of Adam's second moment" in real["text"]
    verdicts = next(s for s in run.sections() if s["title"] == "T5 with real noise: verdicts")
    assert len(verdicts["table"]) == 3 * 2  # 3 claims per delta (4, 16)
    assert [r["arm"] for r in real["table"]] == ["rule", "control"] * 2
    results_rows = next(s for s in run.sections() if s["title"] == "Results")["table"]
    assert sum(r["target"] == "T5 real" for r in results_rows) == 6
    earlier = next(s for s in run.sections() if s["title"] == "Earlier SDEs: verdicts")["table"]
    assert len(earlier) == 2 * 3 and all(v["n"] == 2 for v in earlier)  # 2 optimizers, 3 sigmas
    net = next(s for s in run.sections() if s["title"] == "Earlier SDEs on the small network")
    assert sum("verdict" in r for r in net["table"]) == 2
    done = json.loads((run.path / "done").read_text()) if (run.path / "done").is_file() else {}
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("tag") == "t1" for r in records)
    results = done.get("results", done)
    assert results["targets_total"] > 10 and 0 <= results["targets_passed"] <= results[
        "targets_total"]


def test_sde_config_rejects_bad_values():
    from flatlab.experiments import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=r"^config: real_deltas must be in \[2, 50\), divide "
                       r"real_steps=4000 and leave at least 4 steps, got \[3\]$"):
        resolve_config("sde", overrides=["real_deltas=[3]"])
    cfg_cls = get("sde").config_cls
    with pytest.raises(ValueError):
        cfg_cls(lr=-1.0)
    with pytest.raises(ValueError):
        cfg_cls(paths=1)
