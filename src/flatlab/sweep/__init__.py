"""flatlab.sweep: expand a grid into runs, skip finished ones, launch them, collect tables.

* :func:`expand` crosses grid axes x hyperparameter draws x seeds into :class:`Job` s, each
  with its own folder named by a hash of its overrides (:mod:`flatlab.sweep.grid`).
* :func:`launch_local` / :func:`launch_submitit` run the unfinished jobs as
  ``flatlab run`` processes (:mod:`flatlab.sweep.launch`).
* :func:`collect` rebuilds the DomainBed-style results tables (Markdown and LaTeX) from the
  run folders alone (:mod:`flatlab.sweep.collect`).
"""

from flatlab.sweep.collect import aggregate, collect, load_records, to_latex, to_markdown
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
    "aggregate",
    "collect",
    "draw_hparams",
    "expand",
    "finished",
    "job_argv",
    "launch_local",
    "launch_submitit",
    "load_records",
    "pending",
    "run_job",
    "run_name",
    "seed_hash",
    "to_latex",
    "to_markdown",
]
