"""flatlab: train neural networks toward flat minima, and measure why they work.

Subpackages (imported lazily, so ``import flatlab.optim`` pulls in nothing from matplotlib):

* :mod:`flatlab.optim` - SAM / ASAM / USAM, GAM, SAM+GAM, DGSAM, SAGM, SignSGD, RMSpropW,
  rho schedules and edge-of-stability thresholds.
* :mod:`flatlab.curvature` - Hessian operator, Lanczos eigenvalues, trace, spectral density,
  sharpness measures, loss-surface slices.
* :mod:`flatlab.sparsity` - activation-sparsity probes and the modules that raise sparsity.
* :mod:`flatlab.sde` - stochastic differential equations of SGD, SignSGD, RMSpropW, AdamW.
* :mod:`flatlab.data`, :mod:`flatlab.models`, :mod:`flatlab.train`, :mod:`flatlab.report` -
  the laboratory behind ``flatlab run``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = (
    "optim", "curvature", "sparsity", "sde", "data", "models", "train", "sweep",
    "experiments", "report",
)

__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"flatlab.{name}")
    raise AttributeError(f"module 'flatlab' has no attribute {name!r}")
