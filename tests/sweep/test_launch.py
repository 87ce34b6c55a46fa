"""flatlab.sweep.launch: local process pool and submitit (local executor), skipping finished."""

from __future__ import annotations

import sys

import pytest

from flatlab.sweep import expand, job_argv, launch_local, launch_submitit, pending

# a stand-in for `flatlab run`: makes the run folder with its done marker (or fails on demand)
FAKE = (
    "import pathlib, sys, os; root = pathlib.Path(sys.argv[1]); "
    "sys.exit(3) if 'fail' in sys.argv[2] else None; "
    "run = root / f'fake-{os.getpid()}'; run.mkdir(parents=True); (run / 'done').write_text('{}')"
)


def fake_argv(job):
    return [sys.executable, "-c", FAKE, str(job.run_dir), str(job.overrides["method"])]


def _jobs(tmp_path, methods=("erm", "dgsam")):
    return expand("fake", tmp_path, grid={"method": list(methods)}, seeds=[0, 1])


def test_local_pool_runs_then_skips_finished(tmp_path):
    jobs = _jobs(tmp_path)
    seen = []
    results = launch_local(jobs, workers=2, make_argv=fake_argv, progress=seen.append)
    assert [r.status for r in results] == ["done"] * 4 and len(seen) == 4
    assert pending(jobs) == []
    again = launch_local(jobs, workers=2, make_argv=fake_argv)
    assert [r.status for r in again] == ["skipped"] * 4
    assert len(list(tmp_path.glob("*/fake-*/done"))) == 4  # nothing ran twice
    assert (jobs[0].run_dir / "launcher.log").read_text().startswith("flatlab run fake")


def test_failed_job_is_reported_and_retried_next_time(tmp_path):
    jobs = _jobs(tmp_path, methods=("erm", "fail"))
    results = launch_local(jobs, workers=1, make_argv=fake_argv)
    assert [r.status for r in results] == ["done", "done", "failed", "failed"]
    assert results[2].returncode == 3
    assert pending(jobs) == jobs[2:]


def test_default_command_runs_the_cli_module(tmp_path):
    job = _jobs(tmp_path)[0]
    argv = job_argv(job)
    assert argv[:4] == [sys.executable, "-m", "flatlab.cli", "run"]
    assert argv[-1] == str(job.run_dir)


def test_bad_pool_arguments(tmp_path):
    with pytest.raises(ValueError, match="workers must be >= 1"):
        launch_local(_jobs(tmp_path), workers=0)


def test_submitit_local_executor(tmp_path):
    submitit = pytest.importorskip("submitit")
    jobs = _jobs(tmp_path / "runs")
    (jobs[0].run_dir / "already").mkdir(parents=True)
    (jobs[0].run_dir / "already" / "done").write_text("{}")
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"))
    results = launch_submitit(jobs, folder=tmp_path / "submitit", executor=executor,
                              make_argv=fake_argv, timeout_min=2)
    assert [r.status for r in results] == ["done"] * 3  # the finished job was not submitted
    assert pending(jobs) == []
