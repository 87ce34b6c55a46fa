"""Expand a sweep (grid axes x random hyperparameter draws x seeds) into independent jobs.

DomainBed's sweep, scaled down: every combination of the *grid* axes (e.g. method x test
domain) is crossed with ``n_hparams`` hyperparameter draws and with the seeds. Draw 0 is the
defaults; draw ``i > 0`` samples every key of the *search space* from a generator seeded by
``seed_hash(experiment, i, key)``, so the draws are shared by every grid point (every method and
test domain sees the same learning rates) and adding a key never changes the others.

A search space maps a config key to a distribution written as a string:

* ``"log:LO:HI"``   ``10 ** Uniform(LO, HI)`` (DomainBed's learning rates: ``log:-4.5:-2.5``)
* ``"pow2:LO:HI"``  ``int(2 ** Uniform(LO, HI))`` (batch sizes)
* ``"uniform:LO:HI"`` ``Uniform(LO, HI)``
* ``"choice:A,B,C"`` one of the listed values (parsed as JSON where possible, else strings)

Each job has a folder named by a hash of its full set of overrides, so re-expanding the same
sweep gives the same folders and finished ones can be skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flatlab._checks import check_positive_int


def seed_hash(*args: Any) -> int:
    """Deterministic integer in ``[0, 2**31)`` from any printable arguments (DomainBed's rule)."""
    digest = hashlib.md5(repr(args).encode()).hexdigest()
    return int(digest, 16) % (2**31)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def check_space(space: Mapping[str, str]) -> dict[str, str]:
    """Validate a search space (see the module docstring), raising with the bad entry named."""
    out = {}
    for key, spec in space.items():
        kind, _, rest = str(spec).partition(":")
        if kind in ("log", "pow2", "uniform"):
            parts = rest.split(":")
            try:
                lo, hi = (float(v) for v in parts)
            except ValueError:
                raise ValueError(
                    f"search space {key!r} must be '{kind}:LO:HI' with numbers, got {spec!r}"
                ) from None
            if not lo <= hi:
                raise ValueError(f"search space {key!r} must have LO <= HI, got {spec!r}")
        elif kind == "choice":
            if not rest:
                raise ValueError(f"search space {key!r} must list choices, got {spec!r}")
        else:
            raise ValueError(
                f"search space {key!r} must start with log:, pow2:, uniform: or choice:, "
                f"got {spec!r}"
            )
        out[key] = str(spec)
    return out


def draw(spec: str, rng: np.random.Generator) -> Any:
    """Draw one value from a search-space entry ``spec``."""
    kind, _, rest = spec.partition(":")
    if kind == "choice":
        options = [_parse_value(v) for v in rest.split(",")]
        return options[int(rng.integers(len(options)))]
    lo, hi = (float(v) for v in rest.split(":"))
    u = float(rng.uniform(lo, hi))
    if kind == "log":
        return float(10**u)
    if kind == "pow2":
        return int(math.floor(2**u))
    return u


def draw_hparams(experiment: str, index: int, space: Mapping[str, str]) -> dict[str, Any]:
    """Hyperparameter draw ``index`` of ``space``: ``{}`` (the defaults) for index 0."""
    if index == 0:
        return {}
    return {
        key: draw(spec, np.random.default_rng(seed_hash(experiment, index, key)))
        for key, spec in sorted(space.items())
    }


def format_value(value: Any) -> str:
    """A value as ``--set key=VALUE`` expects it: strings bare, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def run_name(experiment: str, overrides: Mapping[str, Any]) -> str:
    """Folder name of a job: the experiment and a short hash of its sorted overrides."""
    blob = json.dumps(dict(sorted(overrides.items())), sort_keys=True, default=str)
    return f"{experiment}-{hashlib.md5(blob.encode()).hexdigest()[:12]}"


def finished(job_dir: Path) -> bool:
    """True if ``job_dir`` is, or directly contains, a run folder with a ``done`` marker."""
    job_dir = Path(job_dir)
    return (job_dir / "done").exists() or any(job_dir.glob("*/done"))


@dataclass(frozen=True)
class Job:
    """One independent run of a sweep: ``flatlab run EXPERIMENT --set k=v ... --out run_dir``.

    ``run_dir`` is the job's own folder; the run folder (``<experiment>-<timestamp>``) is
    created inside it, so a retried job never overwrites a failed attempt.
    """

    experiment: str
    overrides: dict[str, Any]
    run_dir: Path
    hparams_index: int = 0
    hparams: dict[str, Any] = field(default_factory=dict)
    nproc: int = 1  # ranks of the job's data-parallel run (flatlab run --nproc)

    @property
    def done(self) -> bool:
        """True when the job's folder holds a finished run (a ``done`` marker, any depth 1)."""
        return finished(self.run_dir)

    def command(self) -> list[str]:
        """The equivalent command line (for logs and for users who launch jobs themselves)."""
        sets = [f"{k}={format_value(v)}" for k, v in sorted(self.overrides.items())]
        ranks = ["--nproc", str(self.nproc)] if self.nproc > 1 else []
        return ["flatlab", "run", self.experiment, *[a for s in sets for a in ("--set", s)],
                "--out", str(self.run_dir), *ranks]


def expand(
    experiment: str,
    runs_dir: str | Path,
    *,
    grid: Mapping[str, Sequence[Any]] | None = None,
    space: Mapping[str, str] | None = None,
    n_hparams: int = 1,
    seeds: Sequence[int] = (0,),
    seed_key: str = "seed",
    fixed: Mapping[str, Any] | None = None,
    list_keys: Sequence[str] = (),
) -> list[Job]:
    """Expand grid x hyperparameter draws x seeds into jobs (grid order, then draws, then seeds).

    Args:
        experiment: the registered experiment name (``flatlab list``).
        runs_dir: parent folder of the job folders.
        grid: config key -> the values to cross (e.g. ``{"method": ["erm", "dgsam"]}``).
        space: config key -> search-space spec (module docstring), drawn ``n_hparams - 1`` times.
        n_hparams: number of hyperparameter draws, the defaults included (>= 1).
        seeds: values of ``seed_key`` (one job per seed).
        seed_key: the config key the seed is written to.
        fixed: overrides shared by every job (``--set`` on the command line).
        list_keys: config keys whose field is a list: a scalar grid or seed value ``v`` is
            written as ``[v]`` (e.g. ``seeds`` or ``test_domains`` in ``dg``).

    Raises:
        ValueError: an empty grid axis, no seeds, a bad search space, or a key set twice.
    """
    check_positive_int("n_hparams", n_hparams)
    grid = {k: list(v) for k, v in (grid or {}).items()}
    for key, values in grid.items():
        if not values:
            raise ValueError(f"grid axis {key!r} must have at least one value, got []")
    space = check_space(space or {})
    fixed = dict(fixed or {})
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must hold at least one seed, got []")
    keys = [*grid, *space, seed_key]
    clash = sorted(set(fixed) & set(keys)) or sorted(set(grid) & set(space))
    if clash:
        raise ValueError(f"keys must be set in one place only, got {clash} twice")

    def wrap(key: str, value: Any) -> Any:
        return [value] if key in list_keys and not isinstance(value, list) else value

    jobs = []
    for point in itertools.product(*grid.values()):
        for index in range(n_hparams):
            hp = draw_hparams(experiment, index, space)
            for seed in seeds:
                overrides = {**fixed, **{k: wrap(k, v) for k, v in zip(grid, point)}, **hp,
                             seed_key: wrap(seed_key, seed)}
                jobs.append(Job(experiment, overrides, Path(runs_dir) /
                                run_name(experiment, overrides), index, hp))
    return jobs
