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
dgsam       ``flatlab.optim.DGSAM`` (per-domain closures; arXiv 2503.23430)
sagm        ``flatlab.optim.SAGM`` (per-domain closures; Wang et al., arXiv 2303.10353)
==========  =================================================================================

The wrappers (sam ... sagm) take a ``base`` optimizer, given by name (``"sgd"``, ``"adamw"``,
``"signsgd"``, ``"rmspropw"``) or class; every other keyword (``lr``, ``momentum``,
``weight_decay``, ``rho``, ...) is passed through, so the wrapper's own options and the base's
keywords are both accepted. Classes in :mod:`flatlab.optim` are looked up when called, so this
module imports without them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch

from flatlab._checks import check_choice, check_positive

__all__ = ["OPTIMIZERS", "build_optimizer"]

_BASES = ("sgd", "adamw", "signsgd", "rmspropw")
_WRAPPERS = ("sam", "asam", "usam", "gam", "samgam", "dgsam", "sagm")
OPTIMIZERS: tuple[str, ...] = _BASES + _WRAPPERS

# attribute names tried in flatlab.optim for each flatlab optimizer (first found wins)
_FLATLAB_CLASSES = {
    "signsgd": ("SignSGD",),
    "rmspropw": ("RMSpropW",),
    "sam": ("SAM",),
    "asam": ("SAM",),
    "usam": ("SAM",),
    "gam": ("GAM",),
    "samgam": ("SAMGAM", "SamGam", "SAM_GAM", "GSAMGAM"),
    "dgsam": ("DGSAM",),
    "sagm": ("SAGM",),
}


# the flatlab.optim module defining each class (used when the package does not re-export it)
_MODULES = {"signsgd": "sign", "rmspropw": "sign", "sam": "sam", "asam": "sam", "usam": "sam",
            "gam": "gam", "samgam": "gam", "dgsam": "dgsam", "sagm": "sagm"}


def _flatlab_class(name: str) -> type:
    for module_name in ("flatlab.optim", f"flatlab.optim.{_MODULES[name]}"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in _FLATLAB_CLASSES[name]:
            cls = getattr(module, attr, None)
            if cls is not None:
                return cls
    raise ImportError(
        f"optimizer {name!r} needs flatlab.optim.{_FLATLAB_CLASSES[name][0]}, "
        "which this flatlab does not provide"
    )


def base_class(name: str | type) -> type:
    """The class of a base optimizer given by name (``"sgd"``, ...) or already a class."""
    if isinstance(name, type):
        return name
    check_choice("base", name, _BASES)
    if name == "sgd":
        return torch.optim.SGD
    if name == "adamw":
        return torch.optim.AdamW
    return _flatlab_class(name)


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
        ImportError: the flatlab optimizer class is not available.

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
    if name in _BASES:
        if "base" in kwargs:
            raise ValueError(f"base must not be given for the base optimizer {name!r}")
        return base_class(name)(params, **kwargs)
    base = base_class(kwargs.pop("base", "sgd"))
    if name == "asam":
        kwargs.setdefault("adaptive", True)
    if name == "usam":
        kwargs.setdefault("normalize", False)
    return _flatlab_class(name)(params, base, **kwargs)
