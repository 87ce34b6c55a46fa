"""Activations by name or class, always as fresh ``nn.Module`` instances.

Every model in :mod:`flatlab.models` builds its nonlinearities through :func:`make_activation`,
one new module per use, never a shared instance and never a functional call. Hooks (the
sparsity probe) can therefore find each layer's activation, and ``flatlab.sparsity.sparsify``
can swap one module without touching the others.

Accepted specs: a name from :data:`ACTIVATIONS` (``"relu"``, ``"gelu"``, ...), an
``nn.Module`` subclass (instantiated with no arguments), or a zero-argument callable that
returns a module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

__all__ = ["ACTIVATIONS", "ActivationSpec", "make_activation"]

ActivationSpec = str | type[nn.Module] | Callable[[], nn.Module]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "softplus": nn.Softplus,
    "relu6": nn.ReLU6,
    "identity": nn.Identity,
}


def make_activation(spec: ActivationSpec) -> nn.Module:
    """A new activation module for ``spec`` (a name, a module class, or a factory).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
        TypeError: if ``spec`` does not produce an ``nn.Module``.
    """
    if isinstance(spec, str):
        key = spec.lower()
        if key not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(map(repr, ACTIVATIONS))} or an nn.Module "
                f"class, got {spec!r}"
            )
        return ACTIVATIONS[key]()
    if isinstance(spec, nn.Module):
        raise TypeError(
            "activation must be a name or a module class/factory (a fresh instance per layer), "
            f"got the instance {spec!r}"
        )
    if callable(spec):
        module = spec()
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"activation must be a name, an nn.Module class or a factory, got {spec!r}")
