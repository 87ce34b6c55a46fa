"""The dependency direction of docs/architecture.md: instruments import no plotting, no CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("matplotlib", "typer", "pydantic", "sklearn", "mnist1d", "flatlab.train",
         "flatlab.report", "flatlab.experiments")


@pytest.mark.parametrize("package", ["optim", "curvature", "sparsity", "sde", "data", "models"])
def test_core_packages_import_no_laboratory(package: str) -> None:
    code = (f"import sys, flatlab.{package}\n"
            f"bad = [m for m in {HEAVY!r} if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"flatlab.{package} imports {out.stdout.strip()}"


def _flatlab_imports() -> dict[str, set[str]]:
    """module -> the flatlab modules it imports anywhere in its file (function-level imports
    included), read statically from src/flatlab."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src"
    graph: dict[str, set[str]] = {}
    for path in (root / "flatlab").rglob("*.py"):
        rel = path.relative_to(root).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        name = ".".join(parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module.startswith("flatlab"):
                    deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("flatlab"))
        graph[name] = deps
    return graph


def test_no_import_circles_between_modules() -> None:
    """No two modules import each other (directly); a package's __init__ re-exporting its
    own modules does not count."""
    graph = _flatlab_imports()
    circles = set()
    for a, deps in graph.items():
        for b in deps:
            if a in graph.get(b, set()) and a != b:
                pair = frozenset({a, b})
                if not any(m == p or p.startswith(m + ".") for m in pair for p in pair
                           if m != p):
                    circles.add(pair)
    assert circles == set(), sorted(map(sorted, circles))


@pytest.mark.parametrize("module", ["flatlab.report", "flatlab.report.dg", "flatlab.rundir",
                                    "flatlab.sweep"])
def test_reports_and_run_folders_import_no_training_loop(module: str) -> None:
    """Reports read run folders (:mod:`flatlab.rundir`) without the training loop or the
    experiments; the sweep launches ``flatlab run`` processes without importing them."""
    code = (f"import sys, {module}\n"
            "bad = [m for m in ('flatlab.train', 'flatlab.experiments') if m in sys.modules]\n"
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"
