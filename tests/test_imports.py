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
