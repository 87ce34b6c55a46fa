"""`flatlab run sparsity --quick` end to end: results, figures and report sections."""

from __future__ import annotations

import json

import pytest

from flatlab.experiments import launch


def test_sparsity_quick_end_to_end(tmp_path) -> None:
    run = launch("sparsity", quick=True, out=tmp_path)
    res = run.results()
    for key in ("emergence_min_delta_pts", "noise_spearman", "sam0.1_sparser_seeds",
                "jsrelu_sparser_seeds", "jsrelu_acc_gap_pts", "spectra_max_growth",
                "random_label_gap_pts"):
        assert key in res, key
    assert -1.0 <= res["noise_spearman"] <= 1.0
    for fig in ("emergence", "noise", "sam_vs_sgd", "modules"):
        assert (run.path / "plots" / f"{fig}.png").stat().st_size > 1000
    report = (run.path / "report.md").read_text()
    for title in ("1. Emergence", "2. Noise scale", "3. SAM vs SGD", "4. Modules",
                  "5. Derivative vs output sparsity", "6. Spectra and random labels",
                  "6. Spectra: verdicts",
                  "7. Finetuning with the ReLU -> J-SquaredReLU ramp",
                  "8. Tiny pre-LN ViT at matched accuracy"):
        assert f"## {title}" in report
    # target 5 and the finetuning study give one report.stats verdict per claim
    sections = {s["title"]: s for s in run.sections()}
    band = next(v for k, v in sections.items() if k.startswith("5. Derivative"))["table"]
    assert len(band) == 2 * 5 and all(v["n"] == 2 for v in band)  # ReLU + 4 shifts, 2 gates
    assert isinstance(res["band.all_four_rise"], bool)
    mods = next(v for k, v in sections.items() if k == "4. Modules: verdicts")["table"]
    assert len(mods) in (1, 2) and all(v["n"] == 2 for v in mods)
    assert isinstance(res["jsrelu_sparser_pass"], bool)
    assert res["band.relu.band_delta"] > 0  # the reference: ReLU sparsity emerges
    ft = next(v for k, v in sections.items() if k.startswith("7. Finetuning"))["table"]
    assert len(ft) == 2 * 2 and {"finetune.ramp.sparser", "finetune.ramp.acc_kept"} <= set(res)
    vit = next(v for k, v in sections.items() if k.startswith("8. Tiny"))["table"]
    assert len(vit) == 2 and "vit.J-SquaredReLU.sparser" in res
    records = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert any("act_sparsity/blocks.0.act" in r for r in records)
    # the resolved config records the quick switch
    assert json.loads((run.path / "config.json").read_text())["config"]["quick"] is True


def test_sparsity_config_rejects_unknown_parts() -> None:
    import pytest
    from pydantic import ValidationError

    from flatlab.experiments.sparsity import Config

    with pytest.raises(ValidationError, match="parts must be among"):
        Config(parts=["band", "nope"])


def test_vit_sparsity_is_read_at_the_first_epoch_reaching_the_matched_accuracy() -> None:
    import math

    from flatlab.experiments._sparsity_vit import at_accuracy

    curve = [{"step": 0, "loss": 1.0}] + [{"test_acc": a, "act_sparsity": s} for a, s in
                                         [(0.5, 0.60), (0.7, 0.65), (0.69, 0.66), (0.8, 0.70)]]
    assert at_accuracy(curve, 0.7) == 0.65
    assert at_accuracy(curve, 0.8) == 0.70
    assert math.isnan(at_accuracy(curve, 0.81))


def test_spectra_verdicts_are_paired_over_seeds_in_log_growth() -> None:
    import math

    from flatlab.experiments.sparsity import _spectra_verdicts

    # wd 0: the eigenvalue ratio falls (growth < 1); wd 0.01: it falls further, every seed
    log_growth = {0.0: {0: math.log(0.8), 1: math.log(0.7), 2: math.log(0.75)},
                  0.01: {0: math.log(0.5), 1: math.log(0.45), 2: math.log(0.55)}}
    verdicts = _spectra_verdicts(log_growth)
    assert [v.gate.claim.split(" (")[0] for v in verdicts] == [
        "training lowers the eigenvalue ratio of KKᵀ at wd 0",
        "training lowers the eigenvalue ratio of KKᵀ at wd 0.01",
        "weight decay 0.01 lowers the eigenvalue ratio more than none"]
    assert all(v.passed and v.interval.n == 3 for v in verdicts)
    assert verdicts[2].interval.estimate == pytest.approx(
        sum(math.log(a / b) for a, b in [(0.5, 0.8), (0.45, 0.7), (0.55, 0.75)]) / 3)
    grows = _spectra_verdicts({0.0: {0: 1.2, 1: 1.1}, 0.01: {1: 2.0}})  # one common seed
    assert len(grows) == 1 and not grows[0].passed
