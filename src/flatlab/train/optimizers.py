"""Optimizers by name: one place that maps a config string to a torch/flatlab optimizer.

==========  =================================================================================
name        optimizer
==========  =================================================================================
sgd         ``torch.optim.SGD``
adamw       ``torch.optim.AdamW``
signsgd     ``flatlab.optim.SignSGD``
rmspropw    ``flatlab.optim.RMSpropW``
sam         ``flatlab.optim.SAM`` (normalized; Foret et al., arXiv 2010.01412)
asam        ``flatlab.optim.SAM(adaptive=True)`` (Kwon et al., arXiv 2102.11600)
usam        ``flatlab.optim.SAM(normalize=False)`` (Andriushchenko & Flammarion, 2206.06232)
gam         ``flatlab.optim.GAM`` (Zhang et al., arXiv 2303.03108)
samgam      ``flatlab.optim`` SAM+GAM
gsam        ``flatlab.optim.GSAM`` (Zhuang et al., arXiv 2203.08065)
wsam        ``flatlab.optim.WSAM`` (Yue et al., arXiv 2305.15817)
looksam     ``flatlab.optim.LookSAM`` (Liu et al., arXiv 2203.02714)
fsam        ``flatlab.optim.FriendlySAM`` (Li et al., arXiv 2403.12350)
dgsam       ``flatlab.optim.DGSAM`` (per-domain closures; arXiv 2503.23430)
sagm        ``flatlab.optim.SAGM`` (per-domain closures; Wang et al., arXiv 2303.10353)
==========  =================================================================================

The wrappers (sam ... sagm) take a ``base`` optimizer, given by name (``"sgd"``, ``"adamw"``,
``"signsgd"``, ``"rmspropw"``) or class; every other keyword (``lr``, ``momentum``,
``weight_decay``, ``rho``, ...) is passed through, so the wrapper's own options and the base's
keywords are both accepted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from flatlab import optim
from flatlab._checks import check_choice, check_positive

__all__ = ["BASES", "OPTIMIZERS", "WRAPPERS", "base_class", "build_optimizer"]

#: base optimizers: name -> class
BASES: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
    "signsgd": optim.SignSGD,
    "rmspropw": optim.RMSpropW,
}
#: sharpness-aware wrappers: name -> (class, keyword defaults that select the variant)
WRAPPERS: dict[str, tuple[type[optim.SharpnessAware], dict[str, Any]]] = {
    "sam": (optim.SAM, {}),
    "asam": (optim.SAM, {"adaptive": True}),
    "usam": (optim.SAM, {"normalize": False}),
    "gam": (optim.GAM, {}),
    "samgam": (optim.SAMGAM, {}),
    "gsam": (optim.GSAM, {}),
    "wsam": (optim.WSAM, {}),
    "looksam": (optim.LookSAM, {}),
    "fsam": (optim.FriendlySAM, {}),
    "dgsam": (optim.DGSAM, {}),
    "sagm": (optim.SAGM, {}),
}
OPTIMIZERS: tuple[str, ...] = (*BASES, *WRAPPERS)


def base_class(name: str | type) -> type:
    """The class of a base optimizer given by name (``"sgd"``, ...) or already a class."""
    if isinstance(name, type):
        return name
    return BASES[check_choice("base", name, tuple(BASES))]


def build_optimizer(
    name: str, params: Iterable[torch.Tensor] | Iterable[dict], **kwargs: Any
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over ``params``.

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        **kwargs: ``lr`` (required, > 0) and the optimizer's keywords; wrappers also take
            ``base`` (default ``"sgd"``) and ``rho`` etc.

    Raises:
        ValueError: unknown ``name``, or ``lr`` missing or not > 0.

    Example:
        >>> import torch
        >>> opt = build_optimizer("sgd", torch.nn.Linear(2, 1).parameters(), lr=0.1)
        >>> type(opt).__name__
        'SGD'
    """
    check_choice("optimizer", name, OPTIMIZERS)
    if "lr" not in kwargs:
        raise ValueError(f"lr must be given for optimizer {name!r}, got no lr")
    kwargs["lr"] = check_positive("lr", kwargs["lr"])
    if name in BASES:
        if "base" in kwargs:
            raise ValueError(f"base must not be given for the base optimizer {name!r}")
        return BASES[name](params, **kwargs)
    base = base_class(kwargs.pop("base", "sgd"))
    cls, defaults = WRAPPERS[name]
    return cls(params, base, **{**defaults, **kwargs})
