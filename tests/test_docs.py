"""Every ```python block in README.md and docs/**/*.md runs, so documented examples stay true.

Blocks of one file share a namespace (a page reads like a tutorial) and run in a temporary
working directory. Fence a block as ```text or ```bash to show code without running it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)


def _pages_with_code() -> list[Path]:
    return [p for p in PAGES if p.exists() and BLOCK.search(p.read_text())]


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    for i, match in enumerate(BLOCK.finditer(page.read_text())):
        code = match.group(1)
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - re-raised with the failing block named
            raise AssertionError(f"{page.name} block {i} failed:\n{code}") from exc
    assert os.getcwd() == str(tmp_path)


LINK = re.compile(r"\]\(([^)#\s]+)")


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    missing = [t for t in LINK.findall(page.read_text())
               if not t.startswith(("http://", "https://")) and not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"
