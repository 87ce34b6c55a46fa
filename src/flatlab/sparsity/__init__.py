"""flatlab.sparsity: activation sparsity from flat minima, measured and encouraged.

Peng, Qi, Shi, Gao, "A Theoretical Explanation of Activation Sparsity through Flat Minima and
Adversarial Robustness", arXiv 2309.03004; Li et al., "The Lazy Neuron Phenomenon",
arXiv 2210.06313.

* :func:`activation_sparsity` / :class:`SparsityProbe` - per-layer zero-derivative and
  zero-output fractions, per position, and the second-matmul FLOPs they would skip.
* :func:`gradient_sparsity` - fractions of ``|dL/dh| < p`` per layer.
* :func:`spectral_concentration` - ``s_max / s_min`` of key weights vs Marchenko-Pastur.
* :func:`augmented_flatness` - ``AF_K`` and its identity with activation density.
* :class:`JSquaredReLU`, :class:`ReLUToJSquaredReLU`, :class:`ZerothBias`,
  :class:`RestrictedLayerNorm`, :func:`sparsify`, :func:`constrain_` - the modules that
  raise sparsity, swapped into a model, with their after-step constraints.
* :class:`ShiftedSquaredS` - a flat band that excludes 0 with a nonzero output on it, to tell
  derivative sparsity from output sparsity.
"""

from flatlab.sparsity.flatness import AugmentedFlatness, augmented_flatness
from flatlab.sparsity.gradients import GradientSparsity, gradient_sparsity
from flatlab.sparsity.modules import (
    JSquaredReLU,
    ReLUToJSquaredReLU,
    RestrictedLayerNorm,
    ShiftedSquaredS,
    ZerothBias,
    j_squared_relu,
)
from flatlab.sparsity.probe import SparsityProbe, SparsityResult, activation_sparsity
from flatlab.sparsity.sparsify import constrain_, sparsify
from flatlab.sparsity.spectra import (
    SpectralConcentration,
    marchenko_pastur_ratio,
    spectral_concentration,
)

__all__ = [
    "AugmentedFlatness",
    "GradientSparsity",
    "JSquaredReLU",
    "ReLUToJSquaredReLU",
    "RestrictedLayerNorm",
    "ShiftedSquaredS",
    "SparsityProbe",
    "SparsityResult",
    "SpectralConcentration",
    "ZerothBias",
    "activation_sparsity",
    "augmented_flatness",
    "constrain_",
    "gradient_sparsity",
    "j_squared_relu",
    "marchenko_pastur_ratio",
    "sparsify",
    "spectral_concentration",
]
