"""The ``flatlab`` command line: help, list, config errors (one line, exit 2), the quickstart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatlab.cli import main
from flatlab.experiments import (
    ConfigError,
    describe_fields,
    get,
    names,
    parse_overrides,
    resolve_config,
)

FLATLAB = shutil.which("flatlab", path=str(Path(sys.executable).parent)) or shutil.which("flatlab")


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


BAD_CONFIGS = [
    (("run", "no_such_experiment"), "unknown experiment 'no_such_experiment'"),
    (("run", "demo", "--set", "no_such_key=1"), "unknown config key 'no_such_key'"),
    (("run", "demo", "--set", "steps=many"), "config steps: Input should be a valid integer"),
    (("run", "demo", "--set", "lr=-0.1"), "config lr: Input should be greater than 0"),
    (("run", "demo", "--set", "data_dir=/no/such/dir"),
     "config data_dir: directory does not exist: /no/such/dir"),
    (("run", "demo", "--set", "optimizers=[sgd, nope]"), "config optimizers.1: Input should be"),
    (("run", "demo", "--config", "/no/such/file.yaml"), "config file does not exist"),
    (("run", "demo", "--set", "lr"), "--set must look like key=value, got 'lr'"),
    (("run", "demo", "--bogus"), "No such option: --bogus"),
    (("report", "/no/such/run"), "not a run folder"),
]


@pytest.mark.parametrize(("args", "message"), BAD_CONFIGS, ids=lambda a: " ".join(a)
                         if isinstance(a, tuple) else None)
def test_bad_configs_print_one_line_and_exit_2(capsys, tmp_path, args, message) -> None:
    code, out, err = _cli(capsys, *args, *(["--out", str(tmp_path)] if args[0] == "run" else []))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert "Traceback" not in err + out
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.skipif(FLATLAB is None, reason="the flatlab console script is not installed")
def test_console_script_bad_config_has_no_traceback(tmp_path) -> None:
    proc = subprocess.run([FLATLAB, "run", "demo", "--set", "lr=-1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: config lr: Input should be greater than 0, got '-1'"]


def test_run_help_lists_every_config_field_with_type_and_default(capsys) -> None:
    code, out, _ = _cli(capsys, "run", "demo", "--help")
    assert code == 0
    for key, typ, default, desc in describe_fields(get("demo").config_cls):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(key + " "))
        assert typ in line and default in line and desc[:20] in line
    assert "steps" in out and "int" in out and "1000" in out and "--set" in out


def test_list_names_the_demo(capsys) -> None:
    code, out, _ = _cli(capsys, "list")
    assert code == 0
    assert any(line.startswith("demo ") for line in out.splitlines())
    assert "demo" in names()


def test_config_layers_file_then_quick_then_set(tmp_path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("lr: 0.3\nsteps: 7\nwidth: 16\n")
    toml_file = tmp_path / "c.toml"
    toml_file.write_text("lr = 0.3\nsteps = 7\n")
    cfg = resolve_config("demo", config_file=yaml_file, overrides=["steps=9"], quick=True)
    assert (cfg.lr, cfg.steps, cfg.width, cfg.quick) == (0.3, 9, 16, True)
    assert resolve_config("demo", config_file=toml_file).steps == 7
    assert resolve_config("demo", overrides=["optimizers=[sgd]"]).optimizers == ["sgd"]
    assert parse_overrides(["a.b=1", "a.c=x", "d=null"]) == {"a": {"b": "1", "c": "x"}, "d": None}
    with pytest.raises(ConfigError, match="unknown config key 'a'"):
        resolve_config("demo", overrides=["a.b=1"])


def _two_runs(tmp_path: Path, tags: tuple[str, ...] = ("sgd",)) -> list[str]:
    from flatlab.train import Run

    dirs = []
    for i in range(2):
        run = Run.create(tmp_path, "demo", {"i": i, "lr": 0.5, "quick": i == 1})
        for tag in tags:
            for step in range(1, 4):
                run.log(tag=tag, step=step, loss=1.0 / (step + i), val_acc=0.5 + 0.1 * step,
                        lambda_max=1.0 + step, edge_gd=4.0)
        run.mark_done({"val_acc": 0.8})
        dirs.append(str(run.path))
    return dirs


def test_report_and_compare_commands(capsys, tmp_path) -> None:
    dirs = _two_runs(tmp_path)
    code, out, _ = _cli(capsys, "report", dirs[0])
    assert code == 0 and "report.html" in out
    assert (Path(dirs[0]) / "report.html").is_file()
    code, out, err = _cli(capsys, "compare", *dirs, "--out", str(tmp_path / "cmp"))
    assert code == 0 and err == ""
    lines = out.splitlines()
    names = [Path(d).name for d in dirs]
    assert lines[0].startswith(f"note: {names[1]}: Quick preview (--quick)")
    settings = lines[lines.index("") + 1:]
    assert settings[0].split() == ["setting", *names]
    assert [ln.split() for ln in settings[2:4]] == [["i", "0", "1"], ["quick", "False", "True"]]
    metrics = next(i for i, ln in enumerate(lines) if ln.startswith("run "))
    assert "val_acc" in lines[metrics] and names[1] in lines[metrics + 3]
    assert lines[-1] == f"comparison: {tmp_path / 'cmp' / 'compare.html'}"
    assert (tmp_path / "cmp" / "compare.html").is_file()


@pytest.mark.skipif(FLATLAB is None, reason="the flatlab console script is not installed")
def test_console_compare_writes_nothing_on_stderr(tmp_path) -> None:
    """Through the real console script (matplotlib warnings would reach stderr)."""
    # 20 phases: the legend that used to sit in the axes made tight_layout warn
    dirs = _two_runs(tmp_path, tags=tuple(f"phase{i}" for i in range(20)))
    proc = subprocess.run([FLATLAB, "compare", *dirs, "--out", str(tmp_path / "cmp")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "always"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "phase19" in proc.stdout


def test_tensorboard_flag_gives_a_clear_message_when_missing(capsys, tmp_path) -> None:
    pytest.importorskip("torch")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        code, _, err = _cli(capsys, "run", "demo", "--quick", "--tensorboard", "--out",
                            str(tmp_path))
        assert code == 2 and "needs the 'tensorboard' package" in err
        assert err.count("\n") == 1 and not list(tmp_path.iterdir())
    else:  # pragma: no cover - only where tensorboard is installed
        pytest.skip("tensorboard is installed; the missing-package message cannot be shown")


@pytest.mark.skipif(FLATLAB is None, reason="the flatlab console script is not installed")
def test_readme_quickstart_demo_quick_names_every_optimizer(tmp_path) -> None:
    """`flatlab demo --quick`, as in the README, through the installed console script."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([FLATLAB, "demo", "--quick"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"report: {run_dir / 'report.html'}" in proc.stdout.replace(str(tmp_path) + "/", "")\
        or "report:" in proc.stdout
    html = (run_dir / "report.html").read_text()
    md = (run_dir / "report.md").read_text()
    optimizers = json.loads((run_dir / "config.json").read_text())["config"]["optimizers"]
    assert optimizers == ["sgd", "sam", "gam"]
    for name in optimizers:
        assert f"<td>{name}</td>" in html and f"| {name} |" in md
    assert "data:image/png;base64," in html
    assert (run_dir / "done").is_file()
    done = json.loads((run_dir / "done").read_text())
    assert done["sam.passes/step"] == 2.0 and done["sgd.passes/step"] == 1.0
    assert torch.isfinite(torch.tensor(done["sgd.lambda_max"]))


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("demo.*")),
                         ids=lambda p: p.name)
def test_example_config_files_resolve(path: Path) -> None:
    cfg = resolve_config("demo", config_file=path)
    assert cfg.lr == 0.5 and "sgd" in cfg.optimizers


def test_readme_quickstart_code_warns_nothing(tmp_path, monkeypatch) -> None:
    """The README's python blocks, run as a user would: no warning at all, in particular not
    "Converting a tensor with requires_grad=True to a scalar" (``step`` returns a detached
    loss, so ``float(opt.step(closure))`` is quiet)."""
    import re
    import warnings

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```", readme, re.S | re.M)
    assert blocks and "float(opt.step(closure))" in blocks[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for code in blocks:
            exec(compile(code, "README.md", "exec"), namespace)
    assert [str(w.message) for w in caught] == []
    assert namespace["loss"].grad_fn is None and not namespace["loss"].requires_grad
