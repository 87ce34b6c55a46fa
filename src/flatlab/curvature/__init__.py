"""flatlab.curvature: Hessian operators, eigenvalues, trace, spectral density, sharpness.

Every measurement takes ``(model, loss_fn, data)`` (data: a tensor pair, a list of batches or
a DataLoader, weighted by batch size) or an operator / dense symmetric tensor, never mutates
the model, and returns a frozen dataclass.
"""

from flatlab.curvature.block_lanczos import block_lanczos
from flatlab.curvature.density import DensityResult, plot_density, spectral_density
from flatlab.curvature.eigen import EigenResult, lanczos, power_iteration, top_eigenvalues
from flatlab.curvature.hvp import (
    GGNOperator,
    HessianOperator,
    ResidualOperator,
    as_operator,
    ggn_operator,
    hessian_operator,
    residual_operator,
)
from flatlab.curvature.landscape import (
    LandscapeResult,
    filter_normalized_direction,
    loss_landscape,
    plot_landscape,
)
from flatlab.curvature.operator import DenseOperator, LinearOperator
from flatlab.curvature.sharpness import (
    DomainSharpnessResult,
    SharpnessResult,
    average_sharpness,
    domain_sharpness,
    first_order_flatness,
    gradient_norm,
    worst_case_sharpness,
)
from flatlab.curvature.trace import (
    TraceResult,
    hessian_trace,
    hutchinson,
    hutchpp,
    xnystrace,
    xtrace,
)

__all__ = [
    "DenseOperator",
    "DensityResult",
    "DomainSharpnessResult",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "LandscapeResult",
    "LinearOperator",
    "ResidualOperator",
    "SharpnessResult",
    "TraceResult",
    "as_operator",
    "average_sharpness",
    "block_lanczos",
    "domain_sharpness",
    "filter_normalized_direction",
    "first_order_flatness",
    "gradient_norm",
    "ggn_operator",
    "hessian_operator",
    "hessian_trace",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "loss_landscape",
    "plot_density",
    "plot_landscape",
    "power_iteration",
    "residual_operator",
    "spectral_density",
    "top_eigenvalues",
    "worst_case_sharpness",
    "xnystrace",
    "xtrace",
]
