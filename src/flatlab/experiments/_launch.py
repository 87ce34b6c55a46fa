"""Launching an experiment: config -> run folder -> ``run(cfg, run)`` -> ``done`` -> report.

:func:`launch` is what ``flatlab run`` calls and what tests call in-process. Resuming reads the
experiment name and config back from ``config.json``, so a resumed run is configured exactly as
the original one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flatlab.experiments._registry import check_factories, check_finite, get, resolve_config
from flatlab.rundir import ConfigError, Run, read_config_json
from flatlab.train.checkpoint import seed_everything
from flatlab.train.parallel import DataParallel, init_from_env


def _tensorboard_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the 'tensorboard' package, which is not installed "
            "(pip install tensorboard), or run without --tensorboard"
        ) from None
    return SummaryWriter


def resolve(
    name: str | None = None,
    *,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
    resume: str | Path | None = None,
) -> tuple[str, Any, Any]:
    """Validate everything a launch needs, writing nothing: ``(name, experiment, config)``.

    Raises:
        ConfigError: unknown experiment or config key, bad value, missing files, a resume
            folder that is not a run of ``name``.
    """
    if resume is not None:
        if config_file is not None or overrides or quick:
            raise ConfigError("--resume continues a run with its saved config; "
                              "drop --config/--set/--quick")
        saved = read_config_json(resume)
        if name is not None and name != saved["experiment"]:
            raise ConfigError(f"--resume folder holds experiment {saved['experiment']!r}, "
                              f"not {name!r}")
        name = saved["experiment"]
        exp = get(name)
        try:
            cfg = exp.config_cls.model_validate(saved["config"])
        except Exception as exc:  # noqa: BLE001 - reported as one line
            msg = str(exc).splitlines()[0]
            raise ConfigError(f"saved config of {resume} no longer validates: {msg}") from None
        check_finite(cfg)
    else:
        if name is None:
            raise ConfigError("an experiment name is needed (see: flatlab list)")
        exp = get(name)
        cfg = resolve_config(name, config_file=config_file, overrides=overrides, quick=quick)
    check_factories(cfg)  # everything is checked before the run folder exists
    return name, exp, cfg


def _open_run(name: str, cfg: Any, out: str | Path, resume: str | Path | None,
              par: DataParallel | None) -> Run:
    """Rank 0 (or the only process) creates or reopens the folder; other ranks follow it."""
    writes = par is None or par.writes
    run = None
    if writes:
        run = (Run.open(resume, resume=True) if resume is not None
               else Run.create(out, name, cfg.model_dump(mode="json")))
    if par is None:
        return run
    path = par.share(str(run.path) if writes else None)  # after rank 0's truncation on resume
    if not writes:
        run = Run.follow(path)
    run.parallel = par
    return run


def launch(
    name: str | None = None,
    *,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    quick: bool = False,
    out: str | Path = "runs",
    resume: str | Path | None = None,
    tensorboard: bool = False,
    report: bool = True,
) -> Run:
    """Run experiment ``name`` (or resume the run folder ``resume``) and write its report.

    In a process that torchrun started at several ranks (``flatlab run --nproc N``), every
    rank runs the experiment data-parallel (:mod:`flatlab.train.parallel`) and only rank 0
    writes the run folder and the report.

    Args:
        name: registered experiment name (not needed with ``resume``).
        config_file: YAML/TOML file of config values.
        overrides: ``"a.b=value"`` strings (``--set``).
        quick: set ``quick=True`` in the config (``--quick``).
        out: parent folder of new run folders.
        resume: an existing run folder to continue from its checkpoints.
        tensorboard: also write TensorBoard event files (needs ``tensorboard``).
        report: write ``report.html`` / ``report.md`` at the end.

    Returns:
        The finished :class:`~flatlab.train.Run`.

    Raises:
        ConfigError: unknown experiment or config key, bad value, missing files.
    """
    writer_cls = _tensorboard_class() if tensorboard else None  # fail before any work
    name, exp, cfg = resolve(name, config_file=config_file, overrides=overrides, quick=quick,
                             resume=resume)
    par = init_from_env()
    run = _open_run(name, cfg, out, resume, par)
    if writer_cls is not None and run.writes:
        run.tensorboard = writer_cls(log_dir=str(run.path / "tensorboard"))
    # global torch settings are restored afterwards, so an in-process launch leaves no trace
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_num_threads())
    seed_everything(int(getattr(cfg, "seed", 0)), bool(getattr(cfg, "deterministic", True)))
    if getattr(cfg, "threads", 0):
        torch.set_num_threads(int(cfg.threads))
    try:
        results = exp.run(cfg, run)
        run.mark_done(results if isinstance(results, dict) else {})
    finally:
        run.close()
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(before[2])
    if report and run.writes:
        from flatlab.report import write_report

        write_report(run.path)
    if par is not None:
        par.close()
    return run
