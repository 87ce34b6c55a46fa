"""docs/distributed.md's examples, fenced ```python torchrun, run as one script under torchrun
at 2 processes (gloo on CPU). (tests/test_docs.py runs only plain ```python blocks.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "distributed.md"
BLOCK = re.compile(r"^```python torchrun[ \t]*\n(.*?)^```", re.S | re.M)


def _scripts() -> list[str]:
    """The page's torchrun blocks, grouped into scripts: a block that opens a process group
    starts a new script, the following blocks continue it."""
    scripts: list[str] = []
    for code in BLOCK.findall(PAGE.read_text()):
        if "init_process_group" in code or not scripts:
            scripts.append(code)
        else:
            scripts[-1] += "\n" + code
    return scripts


def test_the_page_has_examples():
    assert len(_scripts()) == 3


@pytest.mark.parametrize("index", range(3), ids=["fsdp2", "ddp", "measurements"])
def test_example_runs_under_torchrun_at_two_processes(index, tmp_path):
    pytest.importorskip("torch.distributed.fsdp")
    script = tmp_path / f"example{index}.py"
    script.write_text(_scripts()[index])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", str(script)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "rank-0 " in out.stdout
