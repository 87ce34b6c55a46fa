"""Every bad input through the real ``flatlab`` console script: exit 2, at most two stderr
lines, no traceback, and nothing written (no new folder, a damaged run folder unchanged)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FLATLAB = shutil.which("flatlab", path=str(Path(sys.executable).parent)) or shutil.which("flatlab")
pytestmark = pytest.mark.skipif(FLATLAB is None, reason="console script not installed")

FACTORIES = textwrap.dedent("""
    import torch

    def pair():
        x = torch.randn(32, 4)
        return x, (x[:, 0] > 0).long()

    def mlp(input_shape, num_classes):
        return torch.nn.Linear(input_shape[0], num_classes)
""")


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "MPLBACKEND": "Agg"}
    return subprocess.run([FLATLAB, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short finished demo run (three phases, one checkpoint each), copied per damage."""
    root = tmp_path_factory.mktemp("runs")
    proc = _cli(root, "run", "demo", "--quick", "--set", "steps=20", "--set", "eig_every=10",
                "--set", "checkpoint_every=10", "--out", "runs")
    assert proc.returncode == 0, proc.stderr
    (run,) = (root / "runs").iterdir()
    return run


def _damage(run: Path, where: Path, what: str) -> Path:
    copy = where / "damaged"
    shutil.copytree(run, copy)
    if what == "config":
        text = (copy / "config.json").read_text()
        (copy / "config.json").write_text(text[: len(text) // 2])
    elif what == "all_checkpoints":
        for ckpt in copy.glob("checkpoints/*/latest.pt"):
            ckpt.write_bytes(ckpt.read_bytes()[:100])
    elif what == "sections":
        (copy / "sections.json").write_text('[{"title": ')
    return copy


# (case id, argv; "{run}" is replaced by a damaged copy of the finished run, damage)
CASES = [
    ("lr_inf", ["run", "eos", "--quick", "--set", "lr=inf"], None),
    ("lr_nan", ["run", "demo", "--quick", "--set", "lr=nan"], None),
    ("rho_list_inf", ["run", "flatness", "--quick", "--set", "sam_rhos=[0.05, .inf]"], None),
    ("unknown_experiment", ["run", "nope"], None),
    ("unknown_key", ["run", "demo", "--set", "widht=3"], None),
    ("bad_type", ["run", "demo", "--set", "steps=many"], None),
    ("negative", ["run", "demo", "--set", "lr=-1"], None),
    ("set_without_equals", ["run", "demo", "--set", "lr"], None),
    ("bad_yaml_list", ["run", "demo", "--set", "optimizers=[sgd, "], None),
    ("unknown_optimizer", ["run", "demo", "--set", "optimizers=[sgd, nope]"], None),
    ("missing_config_file", ["run", "demo", "--config", "nope.yaml"], None),
    ("missing_factory_module", ["run", "flatness", "--quick", "--set", "model=nosuch:fn",
                                "--set", "data=nosuch:fn"], None),
    ("missing_factory_attr", ["run", "flatness", "--quick", "--set", "model=factories:nope",
                              "--set", "data=factories:pair"], None),
    ("data_factory_tuple", ["run", "flatness", "--quick", "--set", "model=factories:mlp",
                            "--set", "data=factories:pair"], None),
    ("no_name", ["run"], None),
    ("measure_not_a_checkpoint", ["measure", "notackpt.pt", "--data", "factories:pair"], None),
    ("measure_missing", ["measure", "nope.pt", "--data", "factories:pair"], None),
    ("measure_k0", ["measure", "notackpt.pt", "--data", "factories:pair", "--k", "0"], None),
    ("measure_rho_negative", ["measure", "notackpt.pt", "--data", "factories:pair",
                              "--rho", "-1"], None),
    ("measure_rho_nan", ["measure", "notackpt.pt", "--data", "factories:pair", "--rho", "nan"],
     None),
    ("report_missing", ["report", "nope"], None),
    ("compare_missing", ["compare", "nope", "nope2"], None),
    ("unknown_command", ["nope"], None),
    ("report_truncated_config", ["report", "{run}"], "config"),
    ("report_truncated_sections", ["report", "{run}"], "sections"),
    ("resume_truncated_config", ["run", "--resume", "{run}"], "config"),
    ("resume_all_checkpoints_truncated", ["run", "--resume", "{run}"], "all_checkpoints"),
    ("resume_with_set", ["run", "--resume", "{run}", "--set", "lr=1"], "none"),
]


@pytest.mark.parametrize("case,argv,damage", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(case, argv, damage, tmp_path: Path,
                                                      finished_run: Path) -> None:
    (tmp_path / "factories.py").write_text(FACTORIES)
    (tmp_path / "notackpt.pt").write_text("this is not a checkpoint\n")
    if damage is not None:
        run = _damage(finished_run, tmp_path, damage)
        argv = [a.replace("{run}", str(run)) for a in argv]
    before = _snapshot(tmp_path)
    proc = _cli(tmp_path, *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    assert 1 <= len(lines) <= 2, lines
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") or "Error" in lines[-1], lines
    assert _snapshot(tmp_path) == before, f"{case} wrote files"


def test_data_factory_error_names_the_expected_type(tmp_path: Path) -> None:
    (tmp_path / "factories.py").write_text(FACTORIES)
    proc = _cli(tmp_path, "run", "flatness", "--quick", "--set", "model=factories:mlp",
                "--set", "data=factories:pair")
    assert proc.returncode == 2
    assert "flatlab.data.Splits" in proc.stderr and "tuple" in proc.stderr


def test_resume_falls_back_to_the_previous_valid_checkpoint(tmp_path: Path,
                                                            finished_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    records = (run / "metrics.jsonl").read_text().splitlines()
    ckpt = run / "checkpoints" / "gam" / "latest.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # the last phase's checkpoint is torn
    proc = _cli(tmp_path, "run", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoints/gam/latest.pt is damaged" in warnings[0]
    assert "previous valid checkpoint checkpoints/sam/latest.pt" in warnings[0]
    assert "Traceback" not in proc.stderr
    again = (run / "metrics.jsonl").read_text().splitlines()
    strip = [__import__("json").loads(r) for r in records]
    for r in strip:
        r.pop("step_time", None), r.pop("cpu_time", None)
    redo = [__import__("json").loads(r) for r in again]
    for r in redo:
        r.pop("step_time", None), r.pop("cpu_time", None)
    assert [r.get("step") for r in redo] == [r.get("step") for r in strip]
    assert (run / "checkpoints" / "gam" / "latest.pt.damaged").exists()
    assert (run / "done").exists()


def test_version() -> None:
    proc = subprocess.run([FLATLAB, "--version"], capture_output=True, text=True)
    from flatlab import __version__

    assert proc.returncode == 0 and proc.stdout.strip() == f"flatlab {__version__}"


def test_help_types_are_readable() -> None:
    proc = subprocess.run([FLATLAB, "run", "eos", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "_Pydantic" not in proc.stdout and "Metadata" not in proc.stdout
    assert "one of float32|float64" in proc.stdout
    assert "AfterValidator" not in proc.stdout and "<function" not in proc.stdout
    assert "each one of quadratics|qrm|" in proc.stdout
