"""Spectral concentration of MLP weights, against the Marchenko-Pastur baseline of their shape.

Peng et al., arXiv 2309.03004 (Sec. "spectral concentration"), claim that SGD noise keeps the
nonzero singular values of the key weight ``K`` (shape ``(d_ff, d)``, ``h = K x + b``) close
together, which closes the route of hiding ``eta = dL/dh`` along weak singular directions. For
each weight

.. code-block:: text

    ratio    = s_max / s_min,nz     over singular values s_i > rtol * s_max  ("nonzero"; or
                                    s_i^2 > rtol * mean(s^2), the authors' rule)
    eigenvalue_ratio = ratio^2      the same in the authors' units, eigenvalues of K K^T
    baseline = (1 + sqrt(c)) / (1 - sqrt(c)),   c = min(m, n) / max(m, n)

where ``baseline`` is the ratio of the edges of the Marchenko-Pastur law for an ``m x n``
matrix of i.i.d. entries (Marchenko & Pastur 1967), i.e. what a Gaussian initialisation already
gives (3 for ``d_ff = 4 d``; infinite for a square matrix). ``normalized = ratio / baseline``.
The default weights are the key layers: the ``nn.Linear`` right before each activation found by
:mod:`flatlab.sparsity.probe` discovery.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from flatlab._checks import check_choice, check_in_range
from flatlab.sparsity._discovery import neighbour_linear, resolve_modules


@dataclass(frozen=True)
class SpectralConcentration:
    """Singular-value concentration per weight.

    Attributes:
        ratio: name -> ``s_max / s_min`` over the nonzero singular values.
        baseline: name -> Marchenko-Pastur edge ratio for the weight's shape.
        normalized: name -> ``ratio / baseline`` (0 when the baseline is infinite).
        rank: name -> number of singular values counted as nonzero.
        shapes: name -> weight shape.
    """

    ratio: dict[str, float]
    baseline: dict[str, float]
    normalized: dict[str, float]
    rank: dict[str, int]
    shapes: dict[str, tuple[int, int]]

    @property
    def eigenvalue_ratio(self) -> dict[str, float]:
        """name -> ``λ_max / λ_min,nz`` of ``K Kᵀ`` (the authors' units): ``ratio ** 2``."""
        return {k: v * v for k, v in self.ratio.items()}


def marchenko_pastur_ratio(rows: int, cols: int) -> float:
    """Edge ratio ``(1 + sqrt(c)) / (1 - sqrt(c))``, ``c = min/max`` (inf when square)."""
    if rows < 1 or cols < 1:
        raise ValueError(f"rows and cols must be >= 1, got {rows} and {cols}")
    c = min(rows, cols) / max(rows, cols)
    return math.inf if c == 1 else (1 + math.sqrt(c)) / (1 - math.sqrt(c))


def key_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weight of the ``nn.Linear`` before each discovered activation, by module name."""
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, torch.Tensor] = {}
    for name in resolve_modules(model, None):
        lin = neighbour_linear(model, name, after=False)
        if lin is not None:
            out[names[id(lin)]] = lin.weight
    if not out:
        raise ValueError(
            f"no nn.Linear found before the activations of {type(model).__name__}; "
            "pass weights={name: tensor}"
        )
    return out


def spectral_concentration(
    model: nn.Module | None = None,
    weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
    *,
    rtol: float = 1e-6,
    relative_to: str = "max",
) -> SpectralConcentration:
    """Largest over smallest nonzero singular value of each weight, with its MP baseline.

    Args:
        model: network whose key weights are used (ignored if ``weights`` is given).
        weights: name -> 2-d tensor, to choose the matrices.
        rtol: the "nonzero" threshold, in ``[0, 1)``.
        relative_to: ``"max"``: ``s_i > rtol * s_max`` (numerical rank, the default);
            ``"mean_sq"``: ``s_i^2 > rtol * mean(s^2)``, the authors' rule on the
            eigenvalues of ``K K^T`` (they use ``rtol = 0.1``), which drops directions that
            weight decay has shrunk.

    Raises:
        ValueError: neither model nor weights, a weight that is not 2-d, or a zero matrix.
    """
    rtol = check_in_range("rtol", rtol, 0.0, 1.0)
    check_choice("relative_to", relative_to, ("max", "mean_sq"))
    if weights is None:
        if model is None:
            raise ValueError("spectral_concentration needs a model or weights, got neither")
        weights = key_weights(model)
    items = list(weights.items()) if isinstance(weights, Mapping) else list(weights)
    ratio, base, norm, rank, shapes = {}, {}, {}, {}, {}
    for name, w in items:
        if w.dim() != 2:
            raise ValueError(f"weights[{name!r}] must be 2-d, got shape {tuple(w.shape)}")
        s = torch.linalg.svdvals(w.detach().double())
        if not s[0] > 0:
            raise ValueError(f"weights[{name!r}] must be nonzero, got a zero matrix")
        if relative_to == "max":
            nz = s[s > rtol * s[0]]
        else:
            nz = s[s**2 > rtol * (s**2).mean()]
        ratio[name] = float(nz[0] / nz[-1])
        base[name] = marchenko_pastur_ratio(*w.shape)
        norm[name] = ratio[name] / base[name] if math.isfinite(base[name]) else 0.0
        rank[name] = int(nz.numel())
        shapes[name] = (int(w.shape[0]), int(w.shape[1]))
    return SpectralConcentration(ratio, base, norm, rank, shapes)
