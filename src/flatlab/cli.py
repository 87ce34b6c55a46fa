"""The ``flatlab`` command line (typer).

Commands::

    flatlab run NAME [--quick] [--set a.b=c ...] [--config FILE.yaml|toml] [--out DIR]
                     [--tensorboard] [--nproc N]
    flatlab run --resume RUN_DIR [--nproc N]
    flatlab run NAME --help        # the experiment's settings: key, type, default, meaning
    flatlab list                   # registered experiments
    flatlab report RUN_DIR         # (re)write report.html / report.md
    flatlab compare RUN_DIR...     # differing settings, final metrics, overlayed curves
    flatlab demo [--quick]         # the README's main command
    flatlab measure CHECKPOINT|RUN_DIR --data mod:fn [--model mod:fn]
                    [--what eig,trace,density,sharpness] [--tag T]   # curvature of a model
    flatlab sweep NAME --out DIR [--grid k=a,b] [--search k=spec] [--seeds 0,1,2] ...
    flatlab collect RUNS_DIR       # DomainBed-style tables (Markdown, LaTeX) from run folders

A configuration problem (unknown experiment or key, wrong type, out-of-range value, missing
file or data directory) prints ONE line ``error: ...`` on stderr and exits with code 2; no
traceback. Progress bars go to stderr, results to stdout.

Adding a command: decorate a function with ``@app.command()`` in this module (keep it a thin
shell around library code; raise :class:`flatlab.train.ConfigError` for user errors).
"""

# typer declares options as call defaults (typer.Option(...)): its documented idiom.
# ruff: noqa: B008

from __future__ import annotations

import sys
from pathlib import Path

import typer
from typer.exceptions import TyperException

from flatlab.rundir import ConfigError

app = typer.Typer(
    name="flatlab",
    help="Train toward flat minima and measure why it works: run experiments, write reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_RUN_OPTIONS = """Options:
  --quick               short version of the run (sets quick=true)
  --set KEY=VALUE       override a setting (repeatable), e.g. --set model.width=64
  --config FILE         YAML or TOML file of settings (--set wins over it)
  --out DIR             parent folder of the run folder  [default: runs]
  --resume RUN_DIR      continue an interrupted run from its checkpoints
  --tensorboard         also write TensorBoard event files (needs tensorboard)
  --nproc N             train data-parallel in N processes (torchrun; rank 0 writes)
  --help                show this message and exit"""


def _experiment_help(name: str) -> str:
    from flatlab.experiments import describe_fields, get

    exp = get(name)
    rows = describe_fields(exp.config_cls)
    widths = [max(len(r[i]) for r in rows + [("setting", "type", "default", "")]) for i in range(3)]
    lines = [f"Usage: flatlab run {name} [OPTIONS]", "", f"  {exp.help}", "", _RUN_OPTIONS, "",
             "Settings (--set KEY=VALUE or --config FILE):",
             "  " + "  ".join(h.ljust(w) for h, w in zip(("setting", "type", "default"), widths))
             + "  description"]
    for key, typ, default, desc in rows:
        lines.append("  " + "  ".join(v.ljust(w) for v, w in zip((key, typ, default), widths))
                     + f"  {desc}")
    return "\n".join(lines)


def _finish(run_path: Path) -> None:
    typer.echo(f"run folder: {run_path}")
    if (run_path / "report.html").exists():
        typer.echo(f"report: {run_path / 'report.html'}")


def _version(value: bool) -> None:
    if value:
        from flatlab import __version__

        typer.echo(f"flatlab {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="print flatlab's version and exit"),
) -> None:
    """Train toward flat minima and measure why it works: run experiments, write reports."""


@app.command(add_help_option=False)
def run(
    name: str | None = typer.Argument(None, help="experiment name (see: flatlab list)"),
    quick: bool = typer.Option(False, "--quick", help="short version of the run"),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE override (repeatable)"),
    config: Path | None = typer.Option(None, "--config", help="YAML/TOML settings file"),
    out: Path = typer.Option(Path("runs"), "--out", help="parent folder of the run folder"),
    resume: Path | None = typer.Option(None, "--resume", help="run folder to continue"),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="write TensorBoard events"),
    nproc: int = typer.Option(1, "--nproc", help="data-parallel processes (torchrun)"),
    show_help: bool = typer.Option(False, "--help", "-h", help="show help and exit"),
) -> int | None:
    """Run experiment NAME into runs/NAME-<timestamp>/ (or continue one with --resume)."""
    if show_help:
        if name is None:
            from flatlab.experiments import names

            typer.echo("Usage: flatlab run NAME [OPTIONS]\n\n" + _RUN_OPTIONS
                       + "\n\nExperiments: " + ", ".join(names()))
        else:
            typer.echo(_experiment_help(name))
        raise typer.Exit(0)
    from flatlab.experiments import launch

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if nproc > 1:
        return _torchrun(nproc, name, quick, set_, config, out, resume, tensorboard)
    result = launch(name, config_file=config, overrides=set_, quick=quick, out=out,
                    resume=resume, tensorboard=tensorboard)
    if result.writes:
        _finish(result.path)
    return None


def _torchrun(nproc: int, name: str | None, quick: bool, set_: list[str], config: Path | None,
              out: Path, resume: Path | None, tensorboard: bool) -> int:
    """Validate here (exit 2, nothing written), then run the same command at ``nproc`` ranks
    under ``torch.distributed.run``; its exit status is returned."""
    import subprocess

    from flatlab.experiments._launch import resolve
    from flatlab.train.parallel import launched_by_torchrun

    if launched_by_torchrun():
        raise ConfigError("--nproc starts its own processes; under torchrun drop --nproc")
    resolve(name, config_file=config, overrides=set_, quick=quick, resume=resume)
    args = [name] if name is not None else []
    args += ["--quick"] if quick else []
    for item in set_:
        args += ["--set", item]
    args += ["--config", str(config)] if config is not None else []
    args += ["--out", str(out)]
    args += ["--resume", str(resume)] if resume is not None else []
    args += ["--tensorboard"] if tensorboard else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), "-m", "flatlab", "run", *args]
    return subprocess.run(command).returncode


@app.command("list")
def list_() -> None:
    """List the registered experiments."""
    from flatlab.experiments import broken, get, names

    for name in names():
        typer.echo(f"{name:<14} {get(name).help}")
    for name, why in broken().items():
        typer.echo(f"{name:<14} (failed to import: {why})")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run folder")) -> None:
    """(Re)write report.html and report.md of RUN_DIR."""
    from flatlab.report import write_report

    html_path, md_path = write_report(run_dir)
    typer.echo(f"report: {html_path}\nmarkdown: {md_path}")


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="run folders"),
    out: Path | None = typer.Option(None, "--out", help="output folder"),
) -> None:
    """Overlay the curves of several runs; print their differing settings and final metrics."""
    from flatlab.report import QUICK_BANNER, compare_runs, format_table

    result = compare_runs(run_dirs, out)
    if result.quick:
        typer.echo(f"note: {', '.join(result.quick)}: {QUICK_BANNER}\n")
    typer.echo(format_table(result.settings) or "The runs have the same settings.")
    typer.echo("\n" + format_table(result.rows))
    if result.summaries:
        typer.echo("\n" + format_table(result.summaries))
    for note in result.joined_notes:
        typer.echo(f"\nnote: {note}")
    if result.joined:
        typer.echo("\nover the runs joined:\n" + format_table(result.joined))
    typer.echo(f"comparison: {result.html_path}")


@app.command()
def demo(
    quick: bool = typer.Option(False, "--quick", help="under a minute (for tests)"),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE override (repeatable)"),
    out: Path = typer.Option(Path("runs"), "--out", help="parent folder of the run folder"),
) -> None:
    """Train an MLP on MNIST-1D with SGD, SAM and GAM, track the top eigenvalue, write a report."""
    from flatlab.experiments import launch

    _finish(launch("demo", quick=quick, overrides=set_, out=out).path)


@app.command()
def sweep(
    name: str = typer.Argument(..., help="experiment name, e.g. dg"),
    out: Path = typer.Option(..., "--out", help="sweep folder (one subfolder per job)"),
    grid: list[str] = typer.Option([], "--grid", help="KEY=A,B,... axis (repeatable)"),
    search: list[str] = typer.Option([], "--search", help="KEY=log:LO:HI|pow2:..|uniform:..|"
                                     "choice:A,B (repeatable)"),
    n_hparams: int = typer.Option(1, "--n-hparams", help="draws per grid point (1st: defaults)"),
    seeds: str = typer.Option("0,1,2", "--seeds", help="comma-separated seeds"),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE fixed for every job"),
    launcher: str = typer.Option("local", "--launcher", help="local or submitit (Slurm)"),
    workers: int = typer.Option(1, "--workers", help="local: concurrent jobs"),
    threads: int = typer.Option(1, "--threads", help="torch threads per job"),
    timeout_min: int = typer.Option(60, "--timeout-min", help="submitit: job time limit"),
    partition: str | None = typer.Option(None, "--partition", help="submitit: Slurm partition"),
    nproc: int = typer.Option(1, "--nproc", help="data-parallel ranks per job (flatlab run "
                              "--nproc)"),
    gpus_per_job: int = typer.Option(0, "--gpus-per-job", help="submitit: GPUs per job "
                                     "(Slurm gpus_per_node)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the job commands, run nothing"),
) -> None:
    """Expand NAME's sweep (grid x draws x seeds) into runs under OUT; skip finished ones."""
    import shlex

    from flatlab.sweep.command import plan, run_sweep

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        if gpus_per_job < 0:
            raise ValueError(f"--gpus-per-job must be >= 0, got {gpus_per_job}")
        jobs = plan(name, out, grid=grid, search=search, n_hparams=n_hparams, seeds=seed_list,
                    sets=set_, nproc=nproc)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    todo = [j for j in jobs if not j.done]
    typer.echo(f"{len(jobs)} jobs, {len(jobs) - len(todo)} finished, {len(todo)} to run")
    if dry_run:
        for j in todo:
            typer.echo(shlex.join(j.command()))
        return
    params = {"timeout_min": timeout_min} if launcher == "submitit" else {}
    if partition and launcher == "submitit":
        params["slurm_partition"] = partition
    if gpus_per_job and launcher == "submitit":
        params["gpus_per_node"] = gpus_per_job
    results = run_sweep(todo, launcher=launcher, workers=workers, threads=threads,
                        progress=lambda r: typer.echo(f"{r.status}: {r.job.run_dir}"), **params)
    failed = [r for r in results if getattr(r, "status", "") == "failed"]
    typer.echo(f"done: {len(results) - len(failed)} ok, {len(failed)} failed (see launcher.log)")


@app.command()
def collect(runs_dir: Path = typer.Argument(..., help="folder holding finished dg runs")) -> None:
    """Rebuild the DomainBed-style results tables (Markdown + LaTeX) from RUNS_DIR's runs."""
    from flatlab.report.dg import collect as collect_tables

    try:
        md, _ = collect_tables(runs_dir)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    typer.echo(md)
    typer.echo(f"written: {runs_dir / 'results.md'}, {runs_dir / 'results.tex'}")


@app.command()
def measure(
    checkpoint: Path = typer.Argument(..., help="checkpoint file, or a run folder"),
    what: str = typer.Option("eig,trace,density,sharpness", "--what",
                             help="comma list of eig, trace, density, sharpness"),
    model: str = typer.Option("", "--model", help="module:function building the model "
                              "(not needed when the checkpoint holds a pickled module)"),
    data: str = typer.Option(..., "--data", help="module:function returning the data"),
    tag: str = typer.Option("", "--tag", help="training phase, when the run has several"),
    k: int = typer.Option(5, "--k", help="number of top eigenvalues"),
    rho: float = typer.Option(0.05, "--rho", help="sharpness radius"),
    loss: str = typer.Option("cross_entropy", "--loss", help="torch.nn.functional loss"),
    tol: float = typer.Option(None, "--tol", help="eigenvalue tolerance (default: "
                              "top_eigenvalues' for the dtype)"),
    stop: str = typer.Option("residual", "--stop", help="eigenvalue stopping rule: residual "
                             "or value (fewer products for the same --tol)"),
    probes: int = typer.Option(99, "--probes", help="Hessian-vector products of the trace"),
    max_matvecs: int = typer.Option(None, "--max-matvecs", help="budget of each quantity: "
                                    "products (loss evaluations for sharpness)"),
    max_seconds: float = typer.Option(None, "--max-seconds", help="budget of the whole "
                                      "measurement in seconds; a cut quantity reports "
                                      "<name>_converged 0"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
) -> None:
    """Hessian eigenvalues, trace, spectral density and sharpness of a saved model."""
    import math

    from flatlab.measure import format_results, measure_checkpoint

    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if not (math.isfinite(rho) and rho >= 0):
        raise ConfigError(f"--rho must be a finite number >= 0, got {rho}")
    from flatlab.curvature.trace import MINIMUM_PROBES

    if probes < MINIMUM_PROBES["xtrace"]:
        raise ConfigError(f"--probes must be >= {MINIMUM_PROBES['xtrace']} (XTrace's minimum), "
                          f"got {probes}")
    for flag, value in (("--tol", tol), ("--max-seconds", max_seconds)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be a finite number > 0, got {value}")
    if max_matvecs is not None and max_matvecs < 1:
        raise ConfigError(f"--max-matvecs must be >= 1, got {max_matvecs}")
    if stop not in ("residual", "value"):
        raise ConfigError(f"--stop must be residual or value, got {stop!r}")

    results = measure_checkpoint(checkpoint, model=model, data=data, what=what,
                                 tag=tag or None, loss=loss, k=k, rho=rho, tol=tol, stop=stop,
                                 probes=probes, max_matvecs=max_matvecs,
                                 max_seconds=max_seconds, progress=not quiet)
    typer.echo(format_results(results))


def _error(message: str) -> int:
    first = (message.strip().splitlines() or ["unknown error"])[0]
    sys.stderr.write(f"error: {first}\n")
    return 2


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, turning user errors into one line and exit code 2."""
    try:
        result = app(args=argv, prog_name="flatlab", standalone_mode=False)
    except TyperException as exc:  # click's usage errors, vendored by typer
        if type(exc).__name__ == "NoArgsIsHelpError":  # `flatlab` alone prints the help
            typer.echo(exc.format_message())
            return 0
        return _error(exc.format_message())
    except typer.Abort:
        sys.stderr.write("aborted\n")
        return 1
    except typer.Exit as exc:
        return int(exc.exit_code)
    except ConfigError as exc:
        return _error(str(exc))
    except (FileNotFoundError, NotADirectoryError) as exc:
        return _error(str(exc))
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
