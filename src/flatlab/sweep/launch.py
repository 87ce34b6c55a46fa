"""Launch sweep jobs: skip finished ones, run the rest in a local process pool or via submitit.

Every job is one ``flatlab run EXPERIMENT --set ... --out JOB_DIR`` command, run as its own
Python process (``python -m flatlab.cli``), so a job that crashes or leaks memory never takes
the sweep down, and a job behaves exactly as if a user had typed its command. Its output goes
to ``JOB_DIR/launcher.log``. A job whose folder already holds a finished run (a ``done``
marker) is skipped, so re-launching an interrupted sweep only runs what is missing.

Launchers:

* :func:`launch_local` (default): a pool of ``workers`` concurrent processes on this machine,
  each limited to ``threads`` torch/OpenMP threads.
* :func:`launch_submitit`: one submitit job per sweep job, for Slurm clusters
  (``submitit.AutoExecutor``); tests drive it with ``submitit.LocalExecutor``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flatlab._checks import check_positive_int
from flatlab.sweep.grid import Job


@dataclass(frozen=True)
class JobResult:
    """How a job ended: ``status`` is ``"done"``, ``"skipped"`` or ``"failed"``."""

    job: Job
    status: str
    returncode: int | None = None


def job_argv(job: Job) -> list[str]:
    """The argument vector that runs ``job`` with this Python interpreter."""
    return [sys.executable, "-m", "flatlab.cli", *job.command()[1:]]


def run_job(job: Job, threads: int = 1, argv: Sequence[str] | None = None) -> JobResult:
    """Run one job in a child process (blocking); skip it if it is already finished.

    ``argv`` replaces the default command :func:`job_argv` (tests, custom wrappers).
    """
    if job.done:
        return JobResult(job, "skipped")
    job.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("MPLBACKEND", "Agg")
    with open(job.run_dir / "launcher.log", "a") as log:
        log.write(" ".join(job.command()) + "\n")
        log.flush()
        argv = list(argv) if argv is not None else job_argv(job)
        proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    ok = proc.returncode == 0 and job.done
    return JobResult(job, "done" if ok else "failed", proc.returncode)


def pending(jobs: Sequence[Job]) -> list[Job]:
    """The jobs whose folder holds no finished run yet."""
    return [j for j in jobs if not j.done]


def launch_local(
    jobs: Sequence[Job],
    *,
    workers: int = 1,
    threads: int = 1,
    progress: Callable[[JobResult], Any] | None = None,
    make_argv: Callable[[Job], list[str]] = job_argv,
) -> list[JobResult]:
    """Run ``jobs`` with at most ``workers`` child processes at once; results in job order.

    Args:
        jobs: the jobs (finished ones are skipped, not re-run).
        workers: concurrent processes (>= 1).
        threads: torch/OpenMP threads per process (>= 1).
        progress: called with each :class:`JobResult` as it completes.
        make_argv: the command of a job (default :func:`job_argv`).
    """
    check_positive_int("workers", workers)
    check_positive_int("threads", threads)

    def one(job: Job) -> JobResult:
        result = run_job(job, threads, make_argv(job))
        if progress is not None:
            progress(result)
        return result

    # threads only wait on child processes, so a thread pool gives a process pool
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, jobs))


def launch_submitit(
    jobs: Sequence[Job],
    *,
    folder: str | Path,
    executor: Any = None,
    threads: int = 1,
    wait: bool = True,
    make_argv: Callable[[Job], list[str]] = job_argv,
    **parameters: Any,
) -> list[Any]:
    """Submit the unfinished ``jobs`` through submitit; return its job handles (or results).

    Args:
        jobs: the jobs; finished ones are not submitted.
        folder: submitit's log folder (``%j`` is replaced by the Slurm job id).
        executor: a submitit executor; default ``submitit.AutoExecutor(folder)`` (Slurm when
            available, else local processes).
        threads: torch/OpenMP threads per job.
        wait: block until every job ended and return the :class:`JobResult` list.
        make_argv: the command of a job (default :func:`job_argv`), built here, before
            submission, so the job only receives plain lists.
        **parameters: passed to ``executor.update_parameters`` (``timeout_min``,
            ``slurm_partition``, ``cpus_per_task``, ``gpus_per_node``, ...).

    Raises:
        ImportError: submitit is not installed (``pip install submitit``).
    """
    try:
        import submitit
    except ImportError as exc:  # pragma: no cover - submitit is a dev dependency
        raise ImportError("launch_submitit needs submitit: pip install submitit") from exc
    if executor is None:
        executor = submitit.AutoExecutor(folder=str(folder))
    if parameters:
        executor.update_parameters(**parameters)
    todo = pending(jobs)
    handles = [executor.submit(run_job, job, threads, make_argv(job)) for job in todo]
    if not wait:
        return handles
    return [h.result() for h in handles]
