"""flatlab.curvature: Hessian operators, eigenvalues, trace, spectral density, sharpness.

Every measurement takes ``(model, loss_fn, data)`` (data: a tensor pair, a list of batches or
a DataLoader, weighted by batch size) or an operator / dense symmetric tensor, never mutates
the model, and returns a frozen dataclass.
"""

from flatlab.curvature.eigen import EigenResult, lanczos, power_iteration, top_eigenvalues
from flatlab.curvature.hvp import (
    GGNOperator,
    HessianOperator,
    ggn_operator,
    hessian_operator,
)
from flatlab.curvature.operator import DenseOperator, LinearOperator, as_operator

__all__ = [
    "DenseOperator",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "LinearOperator",
    "as_operator",
    "ggn_operator",
    "hessian_operator",
    "lanczos",
    "power_iteration",
    "top_eigenvalues",
]
