"""Checkpoints that survive a kill at any instant, random states, and seeding.

A checkpoint is one ``torch.save`` file written to ``<name>.tmp-<pid>``, flushed, fsync'ed and
then moved over the old file with :func:`os.replace`, which is atomic on POSIX: a reader sees the
previous complete checkpoint or the new complete one, never a torn file, even under SIGKILL.

What a resumed run needs to continue bit-for-bit is captured by :func:`rng_state` (torch's CPU
and CUDA generators, numpy's global generator, python's :mod:`random`) next to the model,
optimizer (a wrapper's ``state_dict`` includes its base optimizer), scheduler, data-order and
callback states that :func:`flatlab.train.fit` stores.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["load_checkpoint", "rng_state", "save_checkpoint", "seed_everything", "set_rng_state"]


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` with ``torch.save`` to ``path`` (temp file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # make the rename itself durable (directory entry), best effort on platforms without it
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - e.g. filesystems that refuse directory fsync
        pass
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint does not exist: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict[str, Any]:
    """Every global random state a training step may draw from."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():  # pragma: no cover - CPU-only test machines
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # pragma: no cover
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch, numpy and python; optionally make torch use deterministic algorithms.

    ``deterministic=True`` calls ``torch.use_deterministic_algorithms(True, warn_only=True)``
    and sets ``CUBLAS_WORKSPACE_CONFIG`` (needed by deterministic cuBLAS on GPUs).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
