r"""Stochastic differential equations of SGD, SignSGD, RMSpropW and AdamW.

Source: Compagnoni, Liu, Islamov, Proske, Orvieto, Lucchi, "Adaptive Methods through the Lens
of SDEs: Theoretical Insights on the Role of Noise", ICLR 2025 (arXiv 2411.15958), and for SGD
Li, Tai & E, "Stochastic Modified Equations" (arXiv 1511.06251, JMLR 2019). The stochastic
gradient is ``g = grad f(x) + Z`` with ``Z`` from :mod:`flatlab.sde.noise` (constant
covariance ``Sigma``); time is ``t = k eta`` (first power of the learning rate); every
equation is a weak approximation of order 1 (SGD's corrected drift: order 2).

* SGD (Li-Tai-E): ``dX = -grad f dt + sqrt(eta) Sigma^{1/2} dW``; ``order=2`` uses the drift
  ``-grad(f + (eta/4)|grad f|^2) = -(I + (eta/2) H) grad f``.
* SignSGD, general noise (Thm 3.2): ``dX = -E[sign g] dt + sqrt(eta) Cov(sign g)^{1/2} dW``
  (``- gamma X dt`` with decoupled weight decay).
  ``form="closed"`` (independent coordinates): ``E[sign g_i] = erf(grad_i / (sigma_i sqrt 2))``
  for Gaussian noise (Cor 3.3) or ``2 F_nu(grad_i / s_i) - 1`` for Student-t, and
  ``Cov = diag(1 - E[sign g]^2)``. ``form="monte_carlo"`` estimates both from ``mc_samples``
  draws of ``sign(grad + Z)`` (any noise, e.g. a full Gaussian ``Sigma``): with centred signs
  ``S`` ``(m, d)``, ``S^T w / sqrt(m-1)`` with ``w ~ N(0, dt I_m)`` has covariance exactly the
  sample covariance times ``dt``. The general and erf forms are reconstructed [R] (the note
  shared/research/sde_adaptive.md could not read the paper's body) and validated by the tests.
* RMSpropW [R], ``beta = 1 - eta rho``:
  ``dX = -P^{-1}(grad f dt + sqrt(eta) Sigma^{1/2} dW) - gamma X dt``,
  ``dV = rho((grad f)^2 + diag Sigma - V) dt``, ``P = diag(sqrt V) + eps I``.
* AdamW [R, medium confidence in the drift], ``beta_i = 1 - eta rho_i``,
  ``iota_i(t) = 1 - exp(-rho_i t)`` (bias correction):
  ``dX = -(sqrt(iota_2)/iota_1) P^{-1}(M + eta rho_1 (grad f - M)) dt - gamma X dt``,
  ``dM = rho_1 (grad f - M) dt + sqrt(eta) rho_1 Sigma^{1/2} dW``,
  ``dV = rho_2 ((grad f)^2 + diag Sigma - V) dt``, ``P = diag(sqrt V) + eps sqrt(iota_2) I``.

State tensors have shape ``(paths, d)``; a model's state is a tuple named by ``names`` with
the iterate ``x`` first. ``drift`` and ``diffusion`` give the coefficients; ``step`` advances
one Euler-Maruyama step given standard normals ``z`` ``(paths, noise_dim)`` (``dW = sqrt(dt) z``).
RMSpropW and AdamW update ``V`` (and ``M``) first and use the new ``V`` and ``iota(t + dt)``
inside ``P``: at ``t = 0``, ``V = 0`` and ``iota = 0`` would divide by zero (with ``dt = eta``
this is exactly the order of the discrete update).
"""

from __future__ import annotations

import math

import torch

from flatlab._checks import (
    check_choice,
    check_in_range,
    check_nonnegative,
    check_positive,
    check_positive_int,
)
from flatlab.sde.noise import GaussianNoise, StudentTNoise, _Noise
from flatlab.sde.objectives import Objective

__all__ = ["OptimizerSDE", "SGDSDE", "SignSGDSDE", "RMSpropWSDE", "AdamWSDE"]

State = tuple[torch.Tensor, ...]


def _finite_noise(name: str, noise: _Noise) -> GaussianNoise:
    """The Gaussian with the same covariance (SGD/RMSpropW/AdamW SDEs need only Sigma)."""
    if isinstance(noise, GaussianNoise):
        return noise
    if isinstance(noise, StudentTNoise):
        if noise.nu <= 2:
            raise ValueError(
                f"{name} needs a finite noise covariance (Student-t nu > 2), got nu={noise.nu}"
            )
        return GaussianNoise(noise.variance.sqrt())
    raise TypeError(f"noise must be GaussianNoise or StudentTNoise, got {type(noise).__name__}")


class OptimizerSDE:
    """Base class: an SDE ``dY = b(t, Y) dt + s(t, Y) dW`` for an optimizer on ``objective``."""

    names: tuple[str, ...] = ("x",)

    def __init__(self, objective: Objective, noise: _Noise, lr: float) -> None:
        if not isinstance(objective, Objective):
            raise TypeError(
                f"objective must be a flatlab.sde Objective, got {type(objective).__name__}")
        if not isinstance(noise, _Noise):
            raise TypeError(f"noise must be a flatlab.sde noise model, got {type(noise).__name__}")
        noise.check_dim(objective.dim)
        self.objective = objective
        self.noise = noise
        self.lr = check_positive("lr", lr)

    @property
    def dim(self) -> int:
        return self.objective.dim

    def noise_dim(self) -> int:
        """Number of independent Brownian motions driving the equation."""
        return self.dim

    def initial_state(self, x0: torch.Tensor) -> State:
        """The state at ``t = 0`` for iterates ``x0`` ``(paths, d)`` (moments start at zero)."""
        self.objective.check(x0)
        return (x0,) + tuple(torch.zeros_like(x0) for _ in self.names[1:])

    def drift(self, t: float, state: State) -> State:
        raise NotImplementedError

    def diffusion(self, t: float, state: State, dw: torch.Tensor) -> State:
        """``s(t, Y) dW`` per state component, for increments ``dw`` ``(paths, noise_dim)``."""
        raise NotImplementedError

    def step(self, t: float, dt: float, state: State, z: torch.Tensor) -> State:
        """One Euler-Maruyama step: ``Y + b dt + s sqrt(dt) z``."""
        b = self.drift(t, state)
        s = self.diffusion(t, state, z * math.sqrt(dt))
        return tuple(y + bi * dt + si for y, bi, si in zip(state, b, s))


class SGDSDE(OptimizerSDE):
    """SGD's stochastic modified equation (Li, Tai & E), weak order 1 or 2 (``order``)."""

    def __init__(self, objective: Objective, noise: _Noise, lr: float, *, order: int = 1) -> None:
        super().__init__(objective, noise, lr)
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order!r}")
        self.order = order
        self.gauss = _finite_noise("SGD's SDE", noise)

    def drift(self, t, state):
        x = state[0]
        g = self.objective.grad(x)
        if self.order == 2:
            g = g + (self.lr / 2) * self.objective.hvp(x, g)
        return (-g,)

    def diffusion(self, t, state, dw):
        return (math.sqrt(self.lr) * self.gauss.apply_sqrt(dw),)

    def step(self, t, dt, state, z):
        (b,) = self.drift(t, state)
        return (state[0] + dt * b + math.sqrt(self.lr * dt) * self.gauss.apply_sqrt(z),)


class SignSGDSDE(OptimizerSDE):
    """SignSGD's SDE (Compagnoni et al. 2025, Thm 3.2 / Cor 3.3), see the module docstring.

    Args:
        form: ``"closed"`` (erf / Student-t CDF; needs independent noise coordinates),
            ``"monte_carlo"`` (any noise) or ``"auto"`` (closed when possible).
        mc_samples: noise draws per path and step for ``"monte_carlo"`` (>= 2).
        generator: random source of the Monte Carlo draws.
        weight_decay: decoupled ``gamma`` (``flatlab.optim.SignSGD``'s): adds ``-gamma X dt``.
    """

    def __init__(self, objective: Objective, noise: _Noise, lr: float, *, form: str = "auto",
                 mc_samples: int = 64, generator: torch.Generator | None = None,
                 weight_decay: float = 0.0) -> None:
        super().__init__(objective, noise, lr)
        self.weight_decay = check_nonnegative("weight_decay", weight_decay)
        check_choice("form", form, ("auto", "closed", "monte_carlo"))
        if form == "auto":
            form = "closed" if noise.independent else "monte_carlo"
        if form == "closed" and not noise.independent:
            raise ValueError("form must be 'monte_carlo' for noise with correlated coordinates, "
                             "got 'closed'")
        self.form = form
        self.mc_samples = check_positive_int("mc_samples", mc_samples)
        if self.mc_samples < 2:
            raise ValueError(f"mc_samples must be >= 2, got {mc_samples}")
        self.generator = generator

    def noise_dim(self) -> int:
        return self.dim if self.form == "closed" else self.mc_samples

    def _signs(self, g: torch.Tensor) -> torch.Tensor:
        """``sign(g + Z_j)`` for ``mc_samples`` draws: shape ``(paths, m, d)``."""
        p, d = g.shape
        z = self.noise.sample(p * self.mc_samples, d, generator=self.generator,
                              dtype=g.dtype, device=g.device)
        return torch.sign(g.unsqueeze(1) + z.view(p, self.mc_samples, d))

    def _mean_and_spread(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.objective.grad(x)
        if self.form == "closed":
            m = self.noise.sign_mean(g)  # |m| <= 1 is guaranteed by the noise models
            return m, torch.sqrt(1 - m * m)
        s = self._signs(g)
        m = s.mean(1)
        return m, (s - m.unsqueeze(1)) / math.sqrt(self.mc_samples - 1)

    def drift(self, t, state):
        x = state[0]
        return (-self._mean_and_spread(x)[0] - self.weight_decay * x,)

    def diffusion(self, t, state, dw):
        _, spread = self._mean_and_spread(state[0])
        if self.form == "closed":
            return (math.sqrt(self.lr) * spread * dw,)
        return (math.sqrt(self.lr) * torch.einsum("pmd,pm->pd", spread, dw),)

    def step(self, t, dt, state, z):
        x = state[0]
        m, spread = self._mean_and_spread(x)
        if self.weight_decay:
            m = m + self.weight_decay * x
        c = math.sqrt(self.lr * dt)
        if self.form == "closed":  # fused: x + c * spread * z - dt * m
            return (torch.addcmul(x, spread, z, value=c).sub_(m, alpha=dt),)
        noise = torch.einsum("pmd,pm->pd", spread, z)
        return (x - dt * m + c * noise,)


class RMSpropWSDE(OptimizerSDE):
    """RMSpropW's SDE [R]; ``beta`` is the discrete ``v`` decay, ``rho = (1 - beta) / lr``."""

    names = ("x", "v")

    def __init__(self, objective: Objective, noise: _Noise, lr: float, *, beta: float = 0.999,
                 weight_decay: float = 0.0, eps: float = 1e-8) -> None:
        super().__init__(objective, noise, lr)
        self.beta = check_in_range("beta", beta, 0.0, 1.0)
        self.weight_decay = check_nonnegative("weight_decay", weight_decay)
        self.eps = check_nonnegative("eps", eps)
        self.rho = (1 - self.beta) / self.lr
        self.gauss = _finite_noise("RMSpropW's SDE", noise)

    def drift(self, t, state):
        x, v = state
        g = self.objective.grad(x)
        p = v.sqrt() + self.eps
        var = self.gauss.variance.to(x)
        return (-g / p - self.weight_decay * x, self.rho * (g * g + var - v))

    def diffusion(self, t, state, dw):
        x, v = state
        noise = self.gauss.apply_sqrt(dw) / (v.sqrt() + self.eps)
        return (-math.sqrt(self.lr) * noise, torch.zeros_like(v))

    def step(self, t, dt, state, z):
        x, v = state
        g = self.objective.grad(x)
        var = self.gauss.variance.to(x)
        v = v + (self.rho * dt) * (g * g + var - v)
        p = v.sqrt() + self.eps
        gn = dt * g + math.sqrt(self.lr * dt) * self.gauss.apply_sqrt(z)
        return (x - gn / p - (self.weight_decay * dt) * x, v)


class AdamWSDE(OptimizerSDE):
    """AdamW's SDE [R]: ``betas = (beta_1, beta_2)`` as in ``torch.optim.AdamW``.

    ``weight_decay`` is the decoupled ``gamma`` of ``x <- x - lr * gamma * x`` (torch's
    convention). ``bias_correction=False`` sets ``iota_1 = iota_2 = 1``.
    """

    names = ("x", "m", "v")

    def __init__(self, objective: Objective, noise: _Noise, lr: float, *,
                 betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 eps: float = 1e-8, bias_correction: bool = True) -> None:
        super().__init__(objective, noise, lr)
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta_1, beta_2), got {betas!r}")
        self.betas = (check_in_range("betas[0]", betas[0], 0.0, 1.0),
                      check_in_range("betas[1]", betas[1], 0.0, 1.0))
        self.weight_decay = check_nonnegative("weight_decay", weight_decay)
        self.eps = check_nonnegative("eps", eps)
        self.bias_correction = bool(bias_correction)
        self.rho1 = (1 - self.betas[0]) / self.lr
        self.rho2 = (1 - self.betas[1]) / self.lr
        self.gauss = _finite_noise("AdamW's SDE", noise)

    def iota(self, t: float) -> tuple[float, float]:
        """Bias corrections ``(1 - exp(-rho_1 t), 1 - exp(-rho_2 t))`` (ones if disabled)."""
        if not self.bias_correction:
            return 1.0, 1.0
        return -math.expm1(-self.rho1 * t), -math.expm1(-self.rho2 * t)

    def _x_drift(self, t, x, m, v, g):
        i1, i2 = self.iota(t)
        if i1 == 0.0:
            raise ValueError(f"t must be > 0 for AdamW's bias-corrected drift, got {t}")
        p = v.sqrt() + self.eps * math.sqrt(i2)
        direction = (m + (self.lr * self.rho1) * (g - m)) / p
        return -(math.sqrt(i2) / i1) * direction - self.weight_decay * x

    def drift(self, t, state):
        x, m, v = state
        g = self.objective.grad(x)
        var = self.gauss.variance.to(x)
        return (self._x_drift(t, x, m, v, g), self.rho1 * (g - m), self.rho2 * (g * g + var - v))

    def diffusion(self, t, state, dw):
        x, m, v = state
        dm = math.sqrt(self.lr) * self.rho1 * self.gauss.apply_sqrt(dw)
        return (torch.zeros_like(x), dm, torch.zeros_like(v))

    def step(self, t, dt, state, z):
        x, m, v = state
        g = self.objective.grad(x)
        var = self.gauss.variance.to(x)
        v_new = v + (self.rho2 * dt) * (g * g + var - v)
        dx = self._x_drift(t + dt, x, m, v_new, g)
        m_new = (m + (self.rho1 * dt) * (g - m)
                 + (math.sqrt(self.lr * dt) * self.rho1) * self.gauss.apply_sqrt(z))
        return (x + dt * dx, m_new, v_new)
