"""Test-session settings: one torch thread (the suite's models are tiny; more threads only
add contention on small CI machines), the Agg backend, and a private data cache."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _flatlab_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Cache generated datasets (MNIST-1D) once per session, outside the user's home."""
    if "FLATLAB_CACHE" not in os.environ:
        os.environ["FLATLAB_CACHE"] = str(tmp_path_factory.mktemp("flatlab-cache"))
