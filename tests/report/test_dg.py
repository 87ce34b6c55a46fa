"""flatlab.report.dg: per-seed metrics after selection, paired CIs vs ERM / SAM through
flatlab.report.stats, sharpness at the common step, ERM's validation curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flatlab.report.dg import (
    paired_markdown,
    paired_rows,
    per_seed_metrics,
    validation_curves,
)
from flatlab.report.stats import t_quantile

DOMAINS = ["0", "45", "90"]


def _record(method, domain, seed, acc, final_sharp, *, selected_sharp=99.0, val=0.9, rho=0.05):
    return {
        "dataset": "toy", "method": method, "hparams": {"rho": rho}, "seed": seed,
        "test_domain": domain, "domains": DOMAINS,
        "checkpoints": [{"step": 5, "val": val - 0.1, "test_in": 0.0, "test_out": 0.0},
                        {"step": 10, "val": val, "test_in": acc, "test_out": acc}],
        "selected": {"step": 10, "val": val, "test_in": acc,
                     "sharpness": {"per_domain": {}, "max": selected_sharp, "pooled": 1.0}},
        "final": {"step": 10, "sharpness": {"per_domain": {}, "max": final_sharp,
                                            "pooled": final_sharp / 2}},
        "sec_per_step": 0.01, "passes_per_step": 1,
    }


# per-seed accuracies per test domain for each method; ERM is the reference
ACC = {
    "erm": {0: [0.80, 0.90, 0.70], 1: [0.82, 0.91, 0.72], 2: [0.79, 0.88, 0.69]},
    "dgsam": {0: [0.83, 0.92, 0.72], 1: [0.85, 0.93, 0.75], 2: [0.81, 0.90, 0.72]},
}
SHARP = {"erm": 0.2, "dgsam": 0.1}  # per seed: times (1 + seed), so the log ratio is ln(1/2)


def _records():
    recs = []
    for method, by_seed in ACC.items():
        for seed, accs in by_seed.items():
            for d, a in zip(DOMAINS, accs):
                recs.append(_record(method, d, seed, a, SHARP[method] * (1 + seed)))
    return recs


def test_per_seed_metrics_use_the_selection_and_the_common_step():
    m = per_seed_metrics(_records())
    row = m[("toy", "dgsam")][1]
    assert row["acc"] == pytest.approx(100 * np.mean(ACC["dgsam"][1]))
    assert row["worst"] == pytest.approx(100 * min(ACC["dgsam"][1]))
    assert row["sharp_max"] == pytest.approx(0.2)  # "final", not the selected 99.0
    assert row["log_sharp_max"] == pytest.approx(math.log(0.2))


def test_paired_rows_are_t_intervals_over_seeds_with_verdicts():
    rows = {(r["method"], r["baseline"], r["metric"]): r for r in paired_rows(_records())}
    # no SAM in the records: only the comparison with ERM (and ERM is nobody's method row)
    assert set(rows) == {("dgsam", "erm", m) for m in ("acc", "worst", "log_sharp_max")}
    acc = rows[("dgsam", "erm", "acc")]
    d = [100 * (np.mean(ACC["dgsam"][s]) - np.mean(ACC["erm"][s])) for s in range(3)]
    half = t_quantile(0.975, 2) * np.std(d, ddof=1) / math.sqrt(3)
    assert acc["diff"] == pytest.approx(np.mean(d))
    assert (acc["low"], acc["high"]) == pytest.approx((np.mean(d) - half, np.mean(d) + half))
    assert acc["n"] == 3 and acc["passed"] is (acc["low"] > 0)
    assert acc["verdict"].startswith("reproduced" if acc["passed"] else "not shown")
    sharp = rows[("dgsam", "erm", "log_sharp_max")]
    assert sharp["diff"] == pytest.approx(math.log(0.5)) and sharp["passed"]  # constant ratio
    assert sharp["mean_m"] == pytest.approx(0.2) and sharp["mean_b"] == pytest.approx(0.4)
    assert "flatter" in sharp["claim"] and "95% t CI over 3 seeds" in sharp["sentence"]
    text = paired_markdown(paired_rows(_records()))
    assert text.count("\n") == 2 + 3 and "| dgsam | erm | acc |" in text
    assert acc["test_domains"] == DOMAINS


def test_a_claim_with_an_interval_across_zero_is_not_shown():
    recs = [r for r in _records() if r["method"] == "erm"]
    for seed, shift in ((0, 0.02), (1, -0.03), (2, 0.01)):
        for d, a in zip(DOMAINS, ACC["erm"][seed]):
            recs.append(_record("sam", d, seed, a + shift, 0.2))
    rows = {(r["method"], r["metric"]): r for r in paired_rows(recs)}
    assert rows[("sam", "acc")]["low"] < 0 < rows[("sam", "acc")]["high"]
    assert not rows[("sam", "acc")]["passed"]
    assert rows[("sam", "acc")]["verdict"].startswith("not shown at this scale")


def test_pairs_use_the_test_domains_both_methods_ran_on():
    recs = _records()
    for seed in range(3):  # SAM only on test domain "0"
        recs.append(_record("sam", "0", seed, ACC["erm"][seed][0] - 0.01 * (seed + 1), 0.3))
    rows = {(r["method"], r["baseline"], r["metric"]): r for r in paired_rows(recs)}
    vs_sam = rows[("dgsam", "sam", "acc")]
    assert vs_sam["test_domains"] == ["0"]
    assert vs_sam["mean_m"] == pytest.approx(100 * np.mean([ACC["dgsam"][s][0] for s in range(3)]))
    assert rows[("dgsam", "erm", "acc")]["test_domains"] == DOMAINS
    assert rows[("sam", "erm", "acc")]["diff"] == pytest.approx(-2.0)  # on domain "0" only
    assert not any(r["method"] == "erm" for r in paired_rows(recs))  # ERM is a baseline only


def test_seeds_missing_a_test_domain_are_not_paired():
    recs = [r for r in _records() if not (r["method"] == "dgsam" and r["seed"] == 2
                                          and r["test_domain"] == "90")]
    m = per_seed_metrics(recs)
    assert sorted(m[("toy", "dgsam")]) == [0, 1]
    assert {r["n"] for r in paired_rows(recs)} == {2}
    # one common seed: no interval can be formed, so no row
    recs = [r for r in recs if r["seed"] != 1]
    assert paired_rows(recs) == []


def test_validation_curves_hold_erm_checkpoints_in_percent():
    curves = validation_curves(_records())
    assert len(curves) == 9 and "test 45, seed 2" in curves
    assert curves["test 0, seed 0"] == [{"step": 5, "val": pytest.approx(80.0), "test_in": 0.0},
                                        {"step": 10, "val": pytest.approx(90.0),
                                         "test_in": pytest.approx(80.0)}]


def test_validation_curves_name_runs_apart_by_the_hyperparameters_that_differ():
    recs = [_record("erm", "0", 0, 0.8, 0.1), _record("erm", "0", 0, 0.7, 0.1)]
    recs[0]["hparams"]["lr"], recs[1]["hparams"]["lr"] = 1e-3, 3e-3
    assert sorted(validation_curves(recs)) == ["test 0, seed 0, lr 0.001",
                                               "test 0, seed 0, lr 0.003"]
