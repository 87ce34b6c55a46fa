r"""Closed forms predicted by the optimizer SDEs on ``f = 0.5 x^T H x`` with additive noise.

From Compagnoni et al., ICLR 2025 (arXiv 2411.15958) as reconstructed and derived in
shared/research/sde_adaptive.md; ``lambda_i`` are the eigenvalues of ``H``, ``sigma_i`` the
per-coordinate noise scales (diagonal ``H`` and ``Sigma``), ``d`` the dimension.

* SGD [V, Li-Tai-E]: the OU process ``dX = -HX dt + sqrt(eta) Sigma^{1/2} dW`` has stationary
  covariance ``C`` with ``HC + CH = eta Sigma``, so ``E f_inf = (eta/4) tr Sigma`` for any
  ``H``: quadratic in the noise scale.
* SignSGD [D]: near the minimum (phase 3) the SDE is OU with drift ``-c Sigma^{-1/2} H x`` and
  noise ``sqrt(eta) I``, ``c = 2 f_nu(0)`` (``sqrt(2/pi)`` for Gaussian noise,
  ``f_nu(0) = Gamma((nu+1)/2) / (sqrt(nu pi) Gamma(nu/2))`` for Student-t), so
  ``E f_inf = (eta/4) sum_i sigma_i / c``: linear in the noise, independent of curvature.
* Phases [V: SNR ``Y = Sigma^{-1/2} grad f / sqrt 2`` and the 3/2 threshold; R: the rest]:
  phase 1 ``|Y| > 3/2`` (SignGD), phase 2 ``1 < |Y| <= 3/2``, phase 3 ``|Y| <= 1`` (linear).
* RMSpropW / AdamW [D, momentum ignored]: ``V -> diag Sigma`` so the dynamics become OU with
  drift ``-(Sigma^{-1/2} H + gamma I) x``: ``E f_inf = (eta/4) sum_i lambda_i sigma_i /
  (lambda_i + gamma sigma_i)``, below ``(eta / (4 gamma)) tr H`` for every noise level.
* Scaling rule [V: existence (Lemma 3.13); D: the weight-decay factor]: batch ``B -> delta B``
  maps ``eta -> sqrt(delta) eta``, ``1 - beta_i -> delta (1 - beta_i)``,
  ``gamma -> sqrt(delta) gamma``, ``eps -> eps / sqrt(delta)``; with ``gamma`` unscaled it is
  Malladi et al.'s square-root rule (arXiv 2205.10287).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flatlab._checks import check_in_range, check_nonnegative, check_positive

__all__ = [
    "sgd_stationary_loss", "signsgd_stationary_loss", "adaptive_stationary_loss",
    "adamw_loss_bound", "sign_slope_at_zero", "signal_to_noise", "signsgd_phase",
    "ScaledHyperparameters", "scaling_rule",
]


def _vec(name: str, value: float | torch.Tensor, d: int | None = None) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D tensor, got shape {tuple(t.shape)}")
    if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite and >= 0, got {t.flatten().tolist()[:4]}")
    if d is not None:
        if t.dim() == 1 and t.shape[0] != d:
            raise ValueError(f"{name} must have {d} entries (one per coordinate), got {t.shape[0]}")
        t = t.expand(d)
    return t


def sgd_stationary_loss(
    lr: float, noise_var: float | torch.Tensor, dim: int | None = None
) -> float:
    """``(eta/4) tr Sigma``; ``noise_var`` is ``diag Sigma`` ``(d,)`` or a scalar with ``dim``."""
    lr = check_positive("lr", lr)
    v = _vec("noise_var", noise_var, dim if torch.as_tensor(noise_var).dim() == 0 else None)
    if v.dim() == 0:
        raise ValueError("dim must be given when noise_var is a scalar, got None")
    return lr / 4 * float(v.sum())


def sign_slope_at_zero(nu: float | None = None) -> float:
    """``c = 2 f_nu(0)``, the slope of ``E[sign(g + Z)]`` in ``g / sigma`` at 0.

    ``sqrt(2/pi)`` for Gaussian noise (``nu=None``); ``2/pi`` for Cauchy (``nu=1``).
    """
    if nu is None:
        return math.sqrt(2 / math.pi)
    nu = check_positive("nu", nu)
    return 2 * math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)


def signsgd_stationary_loss(lr: float, noise_scale: float | torch.Tensor, dim: int | None = None,
                            *, nu: float | None = None) -> float:
    """``(eta/4) sum_i sigma_i / c`` (Gaussian: ``(eta/4) sqrt(pi/2) sum_i sigma_i``).

    ``noise_scale`` is ``sigma_i`` (Gaussian std or Student-t scale), ``(d,)`` or a scalar
    with ``dim``; ``nu`` selects Student-t noise.
    """
    lr = check_positive("lr", lr)
    s = _vec("noise_scale", noise_scale, dim if torch.as_tensor(noise_scale).dim() == 0 else None)
    if s.dim() == 0:
        raise ValueError("dim must be given when noise_scale is a scalar, got None")
    return lr / 4 * float(s.sum()) / sign_slope_at_zero(nu)


def adaptive_stationary_loss(lr: float, eigenvalues: torch.Tensor, noise_std: float | torch.Tensor,
                             weight_decay: float = 0.0) -> float:
    """RMSpropW / AdamW: ``(eta/4) sum_i lambda_i sigma_i / (lambda_i + gamma sigma_i)``.

    Ignores momentum: overestimates AdamW by ~10-20% at ``beta_1 = 0.9-0.98`` (see the note).
    """
    lr = check_positive("lr", lr)
    lam = _vec("eigenvalues", eigenvalues)
    if lam.dim() != 1:
        raise ValueError(f"eigenvalues must be a 1-D tensor, got shape {tuple(lam.shape)}")
    s = _vec("noise_std", noise_std, lam.shape[0])
    gamma = check_nonnegative("weight_decay", weight_decay)
    return lr / 4 * float((lam * s / (lam + gamma * s)).sum())


def adamw_loss_bound(lr: float, eigenvalues: torch.Tensor, weight_decay: float) -> float:
    """``(eta / (4 gamma)) tr H``: the limit of :func:`adaptive_stationary_loss` as noise grows."""
    lr = check_positive("lr", lr)
    gamma = check_positive("weight_decay", weight_decay)
    return lr / (4 * gamma) * float(_vec("eigenvalues", eigenvalues).sum())


def signal_to_noise(grad: torch.Tensor, noise_scale: float | torch.Tensor) -> torch.Tensor:
    """``Y = Sigma^{-1/2} grad f / sqrt 2`` elementwise (shape of ``grad``)."""
    s = torch.as_tensor(noise_scale, dtype=grad.dtype, device=grad.device)
    if bool((s <= 0).any()):
        raise ValueError("noise_scale must be > 0, got a non-positive entry")
    return grad / (s * math.sqrt(2))


def signsgd_phase(grad: torch.Tensor, noise_scale: float | torch.Tensor) -> torch.Tensor:
    """SignSGD's phase per coordinate (Lemma 3.4): 1 if ``|Y| > 3/2``, 2 if ``1 < |Y| <= 3/2``,
    3 if ``|Y| <= 1`` (int64, shape of ``grad``)."""
    y = signal_to_noise(grad, noise_scale).abs()
    return torch.where(y > 1.5, 1, torch.where(y > 1, 2, 3))


@dataclass(frozen=True)
class ScaledHyperparameters:
    """Hyperparameters for batch ``delta * B`` from those for batch ``B``."""

    lr: float
    betas: tuple[float, ...]
    weight_decay: float
    eps: float
    delta: float


def scaling_rule(delta: float, *, lr: float, betas: tuple[float, ...] = (0.9, 0.999),
                 weight_decay: float = 0.0, eps: float = 1e-8,
                 scale_weight_decay: bool = True) -> ScaledHyperparameters:
    """Batch-size scaling rule for AdamW / RMSpropW (``betas`` of any length, e.g. ``(beta,)``).

    ``lr -> sqrt(delta) lr``, ``1 - beta -> delta (1 - beta)``, ``weight_decay ->
    sqrt(delta) weight_decay`` (so ``lr * weight_decay`` scales by ``delta``; set
    ``scale_weight_decay=False`` for the square-root rule that leaves it unscaled),
    ``eps -> eps / sqrt(delta)``. Keeps the SDE, hence stationary loss and speed per sample.

    Raises:
        ValueError: ``delta <= 0``, a beta outside [0, 1), or ``delta (1 - beta) >= 1``
            (the scaled beta would be <= 0).

    Example:
        >>> scaling_rule(4, lr=0.01, betas=(0.9, 0.999), weight_decay=0.5).betas
        (0.6, 0.996)
    """
    delta = check_positive("delta", delta)
    lr = check_positive("lr", lr)
    new_betas = []
    for i, b in enumerate(betas):
        b = check_in_range(f"betas[{i}]", b, 0.0, 1.0)
        if delta * (1 - b) >= 1:
            raise ValueError(f"delta * (1 - betas[{i}]) must be < 1, got {delta} * {1 - b:.6g} "
                             f"= {delta * (1 - b):.6g} (the scaled beta would be <= 0)")
        new_betas.append(round(1 - delta * (1 - b), 15))
    root = math.sqrt(delta)
    gamma = check_nonnegative("weight_decay", weight_decay)
    return ScaledHyperparameters(
        lr=root * lr, betas=tuple(new_betas),
        weight_decay=gamma * root if scale_weight_decay else gamma,
        eps=check_nonnegative("eps", eps) / root, delta=delta,
    )
