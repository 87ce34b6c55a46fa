"""flatlab.report.dg_tables and dg.collect: selection, DomainBed averaging, tables from folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from flatlab.report.dg import collect
from flatlab.report.dg_tables import aggregate, load_records

DOMAINS = ["0", "45", "90"]


def _record(method, domain, seed, hp, ckpts, sharp=1.0):
    best = max(ckpts, key=lambda c: c[1])
    return {
        "dataset": "toy", "method": method, "hparams": {"lr": hp}, "hparams_id": str(hp),
        "seed": seed, "test_domain": domain, "domains": DOMAINS,
        "checkpoints": [{"step": s, "val": v, "test_in": ti, "test_out": to}
                        for s, v, ti, to in ckpts],
        "selected": {"step": best[0], "val": best[1], "test_in": best[2],
                     "sharpness": {"per_domain": {}, "max": sharp, "pooled": sharp / 2}},
        "sec_per_step": 0.01, "passes_per_step": 4,
    }


def _write(folder, records, done=True):
    folder.mkdir(parents=True)
    with open(folder / "dg_records.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)
    if done:
        (folder / "done").write_text("{}")


@pytest.fixture
def runs(tmp_path):
    # method "a": two draws; draw 1 has the best validation at step 10 but draw 2 the best
    # last-checkpoint test_out (the oracle's choice)
    k = 0
    for seed in (0, 1):
        for i, d in enumerate(DOMAINS):
            base = 0.5 + 0.1 * i + 0.02 * seed
            r1 = _record("a", d, seed, 1, [(10, 0.9, base, 0.1), (20, 0.8, base - 0.1, 0.2)], 2.0)
            r2 = _record("a", d, seed, 2, [(10, 0.5, 0.0, 0.1), (20, 0.6, base + 0.05, 0.9)], 4.0)
            _write(tmp_path / f"job{k}" / "dg-x", [r1, r2])
            k += 1
    # an unfinished run must be ignored
    _write(tmp_path / "broken" / "dg-y", [_record("a", "0", 0, 3, [(10, 1.0, 1.0, 1.0)])],
           done=False)
    return tmp_path


def test_training_domain_validation_and_oracle(runs):
    records = load_records(runs)
    assert len(records) == 12
    (row,) = aggregate(records, "training-domain validation")
    for i, d in enumerate(DOMAINS):
        accs = [100 * (0.5 + 0.1 * i + 0.02 * s) for s in (0, 1)]
        mean, se = row.per_domain[d]
        assert mean == pytest.approx(np.mean(accs)) and se == pytest.approx(np.std(accs) / 2**0.5)
    means = [row.per_domain[d][0] for d in DOMAINS]
    assert row.average[0] == pytest.approx(np.mean(means))
    assert row.average[1] == pytest.approx(1.0 / 2**0.5 * 1.0)  # per-seed averages 60, 62
    assert row.worst == pytest.approx(min(means))
    assert row.spread == pytest.approx(np.std(means))
    assert row.sharpness_max == 2.0 and row.sharpness_pooled == 1.0
    assert row.passes_per_step == 4 and row.n_seeds == 2
    (oracle,) = aggregate(records, "oracle")
    assert oracle.per_domain["0"][0] == pytest.approx(100 * np.mean([0.55, 0.57]))
    assert math.isnan(oracle.sharpness_max)


def test_collect_writes_markdown_and_latex(runs):
    md, tex = collect(runs)
    assert (runs / "results.md").read_text() == md and (runs / "results.tex").read_text() == tex
    assert "training-domain validation selection (2 seeds)" in md and "oracle" in md
    assert "| a | 51.0 ± 0.7 |" in md
    assert r"\begin{tabular}" in tex and r"51.0 $\pm$ 0.7" in tex


def test_collect_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="runs directory does not exist"):
        collect(tmp_path / "nope")
    with pytest.raises(ValueError, match="no finished run"):
        collect(tmp_path)


def _row(method, avg, worst, spread, sharp, sec):
    from flatlab.report.dg_tables import MethodRow

    return MethodRow("toy", method, "training-domain validation", ("0", "1"), {}, (avg, 0.1),
                     worst, spread, sharp, sharp / 2, sec, 1.0, 3)


def test_target_checks_compare_dgsam_with_erm_and_sam():
    from flatlab.report.dg_tables import target_checks

    rows = [_row("erm", 90.0, 80.0, 5.0, 1.0, 0.010), _row("sam", 91.2, 82.0, 4.0, 0.8, 0.020),
            _row("dgsam", 90.6, 81.0, 4.5, 0.7, 0.012)]
    checks = {c["target"]: c for c in target_checks(rows, {r.method: r.sec_per_step for r in rows},
                                                     num_train_domains=5)}
    assert checks["max sharpness DGSAM / ERM"]["met"]  # 0.7 <= 0.9
    assert checks["max sharpness DGSAM - SAM"]["met"]
    assert checks["mean acc DGSAM - ERM (points)"]["met"]
    assert not checks["mean acc DGSAM - SAM (points)"]["met"]  # 90.6 - 91.2 < -0.5
    assert checks["worst-domain acc DGSAM - ERM"]["met"] and checks["spread DGSAM - ERM"]["met"]
    assert checks["time/step DGSAM / ERM"]["measured"] == 1.2
    assert checks["time/step DGSAM / ERM"]["met"] and checks["time/step DGSAM / SAM"]["met"]
    slow = {c["target"]: c for c in target_checks(rows, {"erm": 1.0, "sam": 1.6, "dgsam": 1.35},
                                                   num_train_domains=5)}
    assert not slow["time/step DGSAM / ERM"]["met"]  # 1.35 > 1.3
    assert not slow["time/step DGSAM / SAM"]["met"]  # 0.84 > 0.8
    assert target_checks(rows[:2], {}, 5) == []
