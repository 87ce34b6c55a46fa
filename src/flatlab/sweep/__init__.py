"""flatlab.sweep: expand a grid into runs, skip finished ones, launch them.

* :func:`expand` crosses grid axes x hyperparameter draws x seeds into :class:`Job` s, each
  with its own folder named by a hash of its overrides (:mod:`flatlab.sweep.grid`).
* :func:`launch_local` / :func:`launch_submitit` run the unfinished jobs as
  ``flatlab run`` processes (:mod:`flatlab.sweep.launch`).

``flatlab collect RUNS_DIR`` then rebuilds the DomainBed-style tables from the run folders
alone: :func:`flatlab.report.dg.collect`.
"""

from flatlab.sweep.grid import Job, draw_hparams, expand, finished, run_name, seed_hash
from flatlab.sweep.launch import (
    JobResult,
    job_argv,
    launch_local,
    launch_submitit,
    pending,
    run_job,
)

__all__ = [
    "Job",
    "JobResult",
    "draw_hparams",
    "expand",
    "finished",
    "job_argv",
    "launch_local",
    "launch_submitit",
    "pending",
    "run_job",
    "run_name",
    "seed_hash",
]
