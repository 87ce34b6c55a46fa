r"""Edge-of-stability thresholds for gradient descent, unnormalized SAM and SAM.

On a quadratic ``L(θ) = ½ θᵀHθ`` every optimizer below acts on each eigen-component of θ
(eigenvalue λ of H) as a scalar linear map, and the top eigenvalue λ_max decides stability.
The *edge* is the largest λ_max for which the iteration does not blow up; on neural networks
the top Hessian eigenvalue rises (progressive sharpening) until it reaches this edge and then
hovers there (Cohen et al., 2021, arXiv 2103.00065).

* **GD** ``θ ← θ − η ∇L(θ)``: a component is multiplied by ``1 − ηλ``, stable iff ``ηλ < 2``,

  .. math:: λ^* = 2/η.

* **USAM** (unnormalized SAM, Andriushchenko & Flammarion 2022, arXiv 2206.06232)
  ``θ ← θ − η ∇L(θ + ρ ∇L(θ))``: the factor is ``1 − ηλ(1 + ρλ)``, stable iff
  ``ηλ(1 + ρλ) < 2``, whose positive root is

  .. math:: λ^* = \frac{\sqrt{1 + 8ρ/η} − 1}{2ρ} = \frac{4}{η\,(1 + \sqrt{1 + 8ρ/η})}.

  The second form is what is computed (no cancellation as ρ → 0, where it tends to 2/η).
  This is the η, ρ-only threshold of Agarwala & Dauphin, "SAM operates far from home"
  (ICML 2023, arXiv 2302.08692).

* **SAM** (normalized, Foret et al. 2021, arXiv 2010.01412)
  ``θ ← θ − η ∇L(θ + ρ g/‖g‖)`` with ``g = ∇L(θ)``: locally USAM with the effective radius
  ``ρ/‖g‖``, so the edge is ``ηλ(1 + ρλ/‖g‖) = 2``,

  .. math:: λ^* = \frac{‖g‖}{2ρ}\left(\sqrt{1 + \frac{8ρ}{η‖g‖}} − 1\right),

  with ``‖g‖`` the full-batch, *unperturbed* gradient norm at the current iterate (Long &
  Bartlett 2023, arXiv 2309.12488). Because the perturbation has bounded length, SAM on a
  fixed quadratic only diverges for ``ηλ > 2``; below that it settles into a period-2 bounce
  along the top eigenvector with amplitude ``ηλρ/(2 − ηλ)`` (:func:`sam_bounce_amplitude`),
  and on that orbit the formula above returns exactly λ. The SAM edge is therefore where
  λ_max is *pinned* during training, given the gradient norm the run produces, not a
  blow-up point.

All thresholds refer to the Hessian of the loss that is actually differentiated: a loss
averaged over classes as well as examples has a Hessian K times smaller than one summed over
K outputs, and the thresholds do not change with it, so λ_max must be measured on the same
loss. Every function here takes and returns Python floats.
"""

from __future__ import annotations

import math
from typing import Any

from flatlab._checks import check_choice, check_nonnegative, check_positive

__all__ = ["METHODS", "edge_of_stability", "sam_bounce_amplitude", "stability_product"]

METHODS = ("gd", "usam", "sam")


def _norm_value(grad_norm: Any) -> float:
    # accept 0-d tensors / numpy scalars as well as floats
    if hasattr(grad_norm, "item") and not isinstance(grad_norm, (int, float)):
        grad_norm = grad_norm.item()
    return check_nonnegative("grad_norm", grad_norm)


def _effective_rho(method: str, rho: float, grad_norm: Any) -> float:
    """Return the radius that multiplies λ in the stability product (inf for SAM at g = 0)."""
    if method == "gd":
        if rho != 0.0:
            raise ValueError(f"rho must be 0 for method 'gd' (GD has no radius), got {rho}")
        if grad_norm is not None:
            raise ValueError("grad_norm must be None for method 'gd'; it only enters 'sam'")
        return 0.0
    if method == "usam":
        if grad_norm is not None:
            raise ValueError(
                "grad_norm must be None for method 'usam' (its edge depends on lr and rho only); "
                "use method='sam' for the normalized, gradient-norm-dependent edge"
            )
        return rho
    if grad_norm is None:
        raise ValueError(
            "grad_norm must be given for method 'sam': its edge depends on the full-batch, "
            "unperturbed gradient norm ||g|| at the current iterate"
        )
    g = _norm_value(grad_norm)
    if rho == 0.0:
        return 0.0
    return math.inf if g == 0.0 else rho / g


def edge_of_stability(
    method: str, lr: float, rho: float = 0.0, grad_norm: float | None = None
) -> float:
    r"""Return the threshold eigenvalue λ* above which ``method`` is unstable at step size ``lr``.

    Args:
        method: ``"gd"`` (λ* = 2/lr), ``"usam"`` (unnormalized SAM, perturbation ``rho*g``) or
            ``"sam"`` (normalized SAM, perturbation ``rho*g/||g||``).
        lr (float): learning rate η > 0 (plain step size, no momentum).
        rho (float, optional): SAM radius ρ >= 0 (default: 0). Must be 0 for ``"gd"``. With
            ``rho=0`` every method returns 2/lr.
        grad_norm (float, optional): full-batch, unperturbed gradient norm ``||g|| >= 0`` at the
            current iterate; required for ``"sam"`` and rejected otherwise. ``grad_norm=0``
            with ``rho>0`` returns the limit 0.

    Returns:
        float: λ* solving ``lr * λ * (1 + ρ_eff λ) = 2`` with ``ρ_eff = 0`` (gd), ``rho``
        (usam) or ``rho / grad_norm`` (sam).

    Raises:
        ValueError: unknown ``method``; ``lr <= 0``; ``rho < 0``; ``rho != 0`` for ``"gd"``;
            ``grad_norm`` missing for ``"sam"``, given for another method, or negative.
        TypeError: a non-real ``lr``, ``rho`` or ``grad_norm``.

    Example:
        >>> edge_of_stability("gd", lr=0.2)
        10.0
        >>> round(edge_of_stability("usam", lr=0.1, rho=0.05), 4)
        12.3607
        >>> edge_of_stability("sam", lr=0.2, rho=0.02, grad_norm=0.1)  # rho/|g| = 0.2
        5.0
    """
    check_choice("method", method, METHODS)
    lr = check_positive("lr", lr)
    rho = check_nonnegative("rho", rho)
    rho_eff = _effective_rho(method, rho, grad_norm)
    if math.isinf(rho_eff):
        return 0.0
    # 4 / (lr (1 + sqrt(1 + 8 rho/lr))) == (sqrt(1 + 8 rho/lr) - 1) / (2 rho), stable as rho -> 0
    return 4.0 / (lr * (1.0 + math.sqrt(1.0 + 8.0 * rho_eff / lr)))


def stability_product(
    method: str, lr: float, sharpness: float, rho: float = 0.0, grad_norm: float | None = None
) -> float:
    """Return ``lr * λ * (1 + ρ_eff λ)``: below 2 the top direction is stable, above 2 it grows.

    ``ρ_eff`` is as in :func:`edge_of_stability` (0, ``rho`` or ``rho/grad_norm``), and
    ``sharpness`` is λ (the top Hessian eigenvalue, >= 0). The product equals 2 exactly when
    ``sharpness == edge_of_stability(method, lr, rho, grad_norm)``.

    Raises:
        ValueError, TypeError: as :func:`edge_of_stability`, and for ``sharpness < 0``.
    """
    check_choice("method", method, METHODS)
    lr = check_positive("lr", lr)
    rho = check_nonnegative("rho", rho)
    lam = check_nonnegative("sharpness", sharpness)
    rho_eff = _effective_rho(method, rho, grad_norm)
    if math.isinf(rho_eff):
        return 0.0 if lam == 0.0 else math.inf
    return lr * lam * (1.0 + rho_eff * lam)


def sam_bounce_amplitude(lr: float, sharpness: float, rho: float) -> float:
    r"""Return the amplitude ``ηλρ/(2 − ηλ)`` of normalized SAM's period-2 orbit on a quadratic.

    On ``L = ½ λ x²`` (the top eigen-direction) with ``0 < ηλ < 2`` and ``x ≠ 0``, SAM maps
    ``x ↦ x − ηλ(x + ρ sign x)``; the orbit ``x = ±A`` with ``A = ηλρ/(2 − ηλ)`` is its
    attractor, and there ``||g|| = λA`` makes :func:`edge_of_stability` (``"sam"``) return λ.

    Raises:
        ValueError: ``lr <= 0``, ``rho < 0``, ``sharpness <= 0`` or ``lr * sharpness >= 2``
            (no bounded orbit: the iteration diverges).
    """
    lr = check_positive("lr", lr)
    lam = check_positive("sharpness", sharpness)
    rho = check_nonnegative("rho", rho)
    if not lr * lam < 2.0:
        raise ValueError(f"lr * sharpness must be < 2 for a bounded SAM orbit, got {lr * lam}")
    return lr * lam * rho / (2.0 - lr * lam)
