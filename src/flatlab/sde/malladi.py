r"""The earlier SDEs of RMSprop and Adam: Malladi, Lyu, Panigrahi & Arora, NeurIPS 2022.

"On the SDEs and Scaling Rules for Adaptive Gradient Algorithms" (arXiv 2205.10287), Def. 4.1
(RMSprop) and Def. 4.4 (Adam), written in flatlab's time ``t = k lr`` instead of theirs,
``t = k lr²``. Their derivation assumes that the gradient noise dominates the gradient
(``σ ~ 1/lr``), so the second-moment state follows the **noise variance only**:

.. code-block:: text

    RMSprop:  dX = -P^{-1}(grad f dt + sqrt(lr) Sigma^{1/2} dW),   P = diag(sqrt V) + eps
              dV = rho (diag Sigma - V) dt,                        rho = (1 - beta) / lr
    Adam:     dX = -(sqrt(iota_2) / iota_1) P^{-1} M dt,   P = diag(sqrt V) + eps sqrt(iota_2)
              dM = rho_1 (grad f - M) dt + sqrt(lr) rho_1 Sigma^{1/2} dW
              dV = rho_2 (diag Sigma - V) dt

(Their ``sigma_0 diag(u)^{1/2}`` with ``u`` the normalized covariance and ``sigma_0 = sigma lr``
is ``lr diag(Sigma)^{1/2}`` in the units of the raw noise; dividing their time by ``lr`` gives
the equations above.) Compagnoni et al.'s SDEs (:class:`~flatlab.sde.RMSpropWSDE`,
:class:`~flatlab.sde.AdamWSDE`) differ in two places: ``V`` tracks ``(grad f)² + diag Sigma``,
and the Adam drift is ``M + lr rho_1 (grad f - M)``. Where the noise dominates the gradient
the two pairs agree; where it does not (small ``sigma``, or early in training) the earlier SDE
underestimates ``V``, so its steps are too large.

The classes subclass the newer ones, so :func:`flatlab.sde.compare` pairs them with the same
discrete optimizers (``RMSpropW``, ``torch.optim.AdamW``); ``weight_decay`` (decoupled) is kept
as in the subclass, though Malladi et al. have none.
"""

from __future__ import annotations

import math

from flatlab.sde.models import AdamWSDE, RMSpropWSDE

__all__ = ["MalladiAdamSDE", "MalladiRMSpropSDE"]


class MalladiRMSpropSDE(RMSpropWSDE):
    """Malladi et al.'s RMSprop SDE: ``V`` follows ``diag Sigma`` only (see module docstring)."""

    def drift(self, t, state):
        x, v = state
        g = self.objective.grad(x)
        var = self.gauss.variance.to(x)
        return (-g / (v.sqrt() + self.eps) - self.weight_decay * x, self.rho * (var - v))

    def step(self, t, dt, state, z):
        x, v = state
        g = self.objective.grad(x)
        v = v + (self.rho * dt) * (self.gauss.variance.to(x) - v)
        gn = dt * g + math.sqrt(self.lr * dt) * self.gauss.apply_sqrt(z)
        return (x - gn / (v.sqrt() + self.eps) - (self.weight_decay * dt) * x, v)


class MalladiAdamSDE(AdamWSDE):
    """Malladi et al.'s Adam SDE: drift ``M`` (no correction), ``V`` follows ``diag Sigma``."""

    def _x_drift(self, t, x, m, v, g):
        i1, i2 = self.iota(t)
        if i1 == 0.0:
            raise ValueError(f"t must be > 0 for Adam's bias-corrected drift, got {t}")
        p = v.sqrt() + self.eps * math.sqrt(i2)
        return -(math.sqrt(i2) / i1) * (m / p) - self.weight_decay * x

    def drift(self, t, state):
        x, m, v = state
        g = self.objective.grad(x)
        var = self.gauss.variance.to(x)
        return (self._x_drift(t, x, m, v, g), self.rho1 * (g - m), self.rho2 * (var - v))

    def step(self, t, dt, state, z):
        x, m, v = state
        g = self.objective.grad(x)
        v_new = v + (self.rho2 * dt) * (self.gauss.variance.to(x) - v)
        dx = self._x_drift(t + dt, x, m, v_new, g)
        m_new = (m + (self.rho1 * dt) * (g - m)
                 + (math.sqrt(self.lr * dt) * self.rho1) * self.gauss.apply_sqrt(z))
        return (x + dt * dx, m_new, v_new)
