"""Training data as the loop sees it: tensor pairs, one per domain, and a resumable sampler.

``as_domains`` turns what a user passes into a list of ``(x, y)`` pairs (one pair = one
ordinary dataset, several = domains). :class:`Sampler` draws minibatch indices by walking a
random permutation of ``range(n)`` in chunks of ``batch_size`` (a new permutation per epoch, the
incomplete last chunk dropped); its permutation and position are part of the checkpoint, and
the permutations come from one ``torch.Generator`` owned by ``fit``, so data order replays
exactly after a resume.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Sampler", "as_domains", "as_pair"]


def as_pair(data: Any, name: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, y)`` from a tensor pair, a ``TensorDataset`` or an object with ``.x``/``.y``.

    Raises:
        TypeError: anything else.
        ValueError: ``x`` and ``y`` disagree in length, or are empty.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(t, torch.Tensor) for t in data
    ):
        x, y = data
    elif hasattr(data, "tensors") and len(data.tensors) >= 2:
        x, y = data.tensors[0], data.tensors[1]
    elif isinstance(getattr(data, "x", None), torch.Tensor) and isinstance(
        getattr(data, "y", None), torch.Tensor
    ):
        x, y = data.x, data.y
    else:
        raise TypeError(
            f"{name} must be an (x, y) tensor pair, a TensorDataset or a list of them (domains), "
            f"got {type(data).__name__}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name} inputs and targets must have the same length, got "
                         f"{x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} must not be empty, got 0 examples")
    return x, y


def as_domains(train: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(x, y)`` pair per domain: ``[pair]`` for a single dataset."""
    try:
        return [as_pair(train)]
    except TypeError:
        pass
    if not isinstance(train, (list, tuple)) and hasattr(train, "names") and hasattr(train, "data"):
        train = list(train.data)  # flatlab.data.Domains
    if isinstance(train, (list, tuple)) and len(train) > 0:
        return [as_pair(d, name=f"train[{i}]") for i, d in enumerate(train)]
    raise TypeError(
        "train must be an (x, y) tensor pair, a TensorDataset or a non-empty list of them "
        f"(domains), got {type(train).__name__}"
    )


class Sampler:
    """Minibatch indices over ``n`` examples: full batch, or shuffled epochs of ``batch_size``."""

    def __init__(self, n: int, batch_size: int | None, generator: torch.Generator) -> None:
        self.n = n
        self.batch_size = None if batch_size is None or batch_size >= n else batch_size
        self.generator = generator
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def next(self) -> torch.Tensor | slice:
        """Indices of the next minibatch (``slice(None)`` in full-batch mode)."""
        if self.batch_size is None:
            return slice(None)
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.perm = state["perm"]
        self.pos = int(state["pos"])
