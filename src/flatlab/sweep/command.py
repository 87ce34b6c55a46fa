"""What ``flatlab sweep`` and ``flatlab collect`` do (the CLI is a thin shell around these).

``flatlab sweep EXPERIMENT --out DIR`` expands the experiment's sweep into jobs and launches
the unfinished ones. The grid and search space come from the command line (``--grid
key=a,b``, ``--search key=log:-4:-2``) or, when none is given, from the ``sweep_defaults(cfg)`` hook
the experiment registered (for ``dg``: methods x test domains, DomainBed's search space scaled
down). ``--set`` values are fixed for every job and also decide the defaults (e.g. the
dataset, hence the test domains).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flatlab._checks import check_positive_int
from flatlab.sweep.grid import Job, expand
from flatlab.sweep.launch import JobResult, launch_local, launch_submitit


def _split(item: str, what: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise ValueError(f"{what} must look like key=value, got {item!r}")
    return key.strip(), value.strip()


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["methods=erm,dgsam", "lr=0.1,0.01"]`` -> ``{"methods": ["erm", "dgsam"], ...}``."""
    return {k: [_value(v) for v in vals.split(",")]
            for k, vals in (_split(i, "--grid") for i in items)}


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``["steps=100"]`` -> ``{"steps": "100"}`` (strings stay strings; the config coerces)."""
    return dict(_split(i, "--set") for i in items)


def plan(
    experiment: str,
    out: str | Path,
    *,
    grid: Sequence[str] = (),
    search: Sequence[str] = (),
    n_hparams: int = 1,
    seeds: Sequence[int] = (0, 1, 2),
    sets: Sequence[str] = (),
    nproc: int = 1,
) -> list[Job]:
    """The jobs of a sweep (nothing is run). Validates ``--set`` against the experiment config.

    ``nproc > 1`` runs every job data-parallel at that many ranks (``flatlab run --nproc``;
    on Slurm, ask for as many GPUs per job).

    Raises:
        ConfigError / ValueError: unknown experiment or key, bad value, bad grid or space.
    """
    from flatlab.experiments import get, resolve_config

    check_positive_int("nproc", nproc)
    exp = get(experiment)
    cfg = resolve_config(experiment, overrides=list(sets))
    defaults: dict[str, Any] = {}
    if exp.sweep_defaults is not None:
        defaults = exp.sweep_defaults(cfg)
    fixed = {**defaults.get("fixed", {}), **parse_sets(sets)}
    user_grid = parse_grid(grid)
    user_space = dict(_split(i, "--search") for i in search)
    grid_ = user_grid or {k: v for k, v in defaults.get("grid", {}).items() if k not in fixed}
    space = user_space or {k: v for k, v in defaults.get("space", {}).items()
                           if k not in fixed and k not in grid_}
    jobs = expand(experiment, out, grid=grid_, space=space, n_hparams=n_hparams,
                  seeds=list(seeds), seed_key=defaults.get("seed_key", "seed"), fixed=fixed,
                  list_keys=defaults.get("list_keys", ()))
    return [dataclasses.replace(j, nproc=nproc) for j in jobs] if nproc > 1 else jobs


def run_sweep(
    jobs: Sequence[Job],
    *,
    launcher: str = "local",
    workers: int = 1,
    threads: int = 1,
    folder: str | Path | None = None,
    progress: Callable[[JobResult], Any] | None = None,
    **submitit_parameters: Any,
) -> list[Any]:
    """Launch ``jobs`` with the ``"local"`` process pool or ``"submitit"`` (Slurm)."""
    if launcher == "local":
        return launch_local(jobs, workers=workers, threads=threads, progress=progress)
    if launcher == "submitit":
        folder = folder or (Path(jobs[0].run_dir).parent / "submitit" if jobs else "submitit")
        return launch_submitit(jobs, folder=folder, threads=threads, **submitit_parameters)
    raise ValueError(f"launcher must be 'local' or 'submitit', got {launcher!r}")
