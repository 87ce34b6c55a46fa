r"""Gradient-noise models: the stochastic gradient is :math:`\nabla f_\gamma(x) = \nabla f(x) + Z`.

Compagnoni et al., "Adaptive Methods through the Lens of SDEs", ICLR 2025 (arXiv 2411.15958)
model a mini-batch gradient as the full gradient plus a zero-mean noise ``Z`` whose covariance
``Sigma`` depends on the batch size only through ``Sigma = Sigma_1 / B``. Two families:

* :class:`GaussianNoise` - ``Z ~ N(0, Sigma)`` with ``Sigma`` diagonal (``std``, shape ``(d,)``
  or a scalar for the isotropic case) or full (``cov``, shape ``(d, d)``, stored as its
  Cholesky factor ``L`` with ``Sigma = L L^T``).
* :class:`StudentTNoise` - ``Z_i = s_i T_i`` with ``T_i`` independent standard Student-t with
  ``nu`` degrees of freedom (heavy tails; infinite variance for ``nu <= 2``).

Each model knows what the SignSGD SDE needs, the sign mean
``E[sign(g + Z)]_i = 2 P(g_i + Z_i > 0) - 1``, which is ``erf(g_i / (sigma_i sqrt 2))`` for the
Gaussian and ``2 F_nu(g_i / s_i) - 1`` for Student-t (``F_nu`` the t CDF). Tensors of points
or gradients have shape ``(paths, d)``. Samples use an explicit ``torch.Generator`` so every
run is seeded.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flatlab._checks import check_positive, check_positive_int, check_real

__all__ = ["GaussianNoise", "StudentTNoise", "student_t_sign_mean"]


def _as_vector(name: str, value: float | torch.Tensor, *, allow_zero: bool) -> torch.Tensor:
    """Scalar or 1-D tensor of per-coordinate scales, checked to be finite and >= 0 (or > 0)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to(torch.float64)
        if t.dim() > 1:
            raise ValueError(f"{name} must be a scalar or a 1-D tensor, got shape {tuple(t.shape)}")
    else:
        t = torch.tensor(check_real(name, value), dtype=torch.float64)
    bad = ~torch.isfinite(t) | ((t < 0) if allow_zero else (t <= 0))
    if bool(bad.any()):
        rule = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {rule}, got {t[bad].flatten()[0].item()}")
    return t


class _Noise:
    """Shared shape logic. ``dim`` is ``None`` for an isotropic scalar model (any dimension)."""

    scale: torch.Tensor  # per-coordinate scale, scalar or (d,)
    independent: bool  # coordinates independent (diagonal): closed-form sign statistics

    @property
    def dim(self) -> int | None:
        return None if self.scale.dim() == 0 else int(self.scale.shape[0])

    def check_dim(self, d: int) -> None:
        """Raise ValueError unless this model can act on vectors of dimension ``d``."""
        if self.dim is not None and self.dim != d:
            raise ValueError(
                f"noise dimension must match the parameter dimension {d}, got {self.dim}"
            )

    def _scale_like(self, x: torch.Tensor) -> torch.Tensor:
        return self._cached("scale", lambda: self.scale, x)

    def _cached(self, key: str, make, x: torch.Tensor) -> torch.Tensor:
        """``make()`` converted to ``x``'s dtype and device, computed once per pair (hot loop)."""
        self.check_dim(x.shape[-1])
        cache = self.__dict__.setdefault("_cache", {})
        k = (key, x.dtype, x.device)
        if k not in cache:
            cache[k] = make().to(dtype=x.dtype, device=x.device)
        return cache[k]

    def sample(
        self,
        paths: int,
        d: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """``paths`` independent draws of ``Z``, shape ``(paths, d)``."""
        raise NotImplementedError

    def sign_mean(self, grad: torch.Tensor) -> torch.Tensor:
        """``E[sign(grad + Z)]`` per coordinate, same shape as ``grad`` ``(paths, d)``."""
        raise NotImplementedError


class GaussianNoise(_Noise):
    r"""Gaussian gradient noise ``Z ~ N(0, Sigma)``.

    Args:
        std: per-coordinate standard deviation ``sigma_i`` (scalar: isotropic, any dimension;
            shape ``(d,)``: diagonal ``Sigma = diag(sigma^2)``). Mutually exclusive with ``cov``.
        cov: full covariance, shape ``(d, d)``, symmetric positive semi-definite.

    Raises:
        ValueError: negative or non-finite ``std``, a non-symmetric or indefinite ``cov``,
            or both / neither of ``std`` and ``cov`` given.

    Example:
        >>> noise = GaussianNoise(torch.tensor([1.0, 2.0])).with_batch_size(4)
        >>> noise.scale.tolist()
        [0.5, 1.0]
    """

    def __init__(self, std: float | torch.Tensor | None = None, *,
                 cov: torch.Tensor | None = None) -> None:
        if (std is None) == (cov is None):
            raise ValueError("exactly one of std and cov must be given, got "
                             f"std={std!r}, cov={'given' if cov is not None else None}")
        self.chol: torch.Tensor | None = None
        if std is not None:
            self.scale = _as_vector("std", std, allow_zero=True)
            self.independent = True
            return
        c = torch.as_tensor(cov).detach().to(torch.float64)
        if c.dim() != 2 or c.shape[0] != c.shape[1]:
            raise ValueError(f"cov must be a square (d, d) matrix, got shape {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()) or not torch.allclose(c, c.T, atol=1e-12, rtol=1e-10):
            raise ValueError("cov must be finite and symmetric, got a matrix that is not")
        evals, evecs = torch.linalg.eigh(c)
        if float(evals.min()) < -1e-10 * max(1.0, float(evals.abs().max())):
            raise ValueError(
                f"cov must be positive semi-definite, got eigenvalue {evals.min():.3g}")
        # Symmetric square root (valid for singular Sigma, unlike Cholesky): Sigma = R R^T.
        self.chol = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
        self.scale = torch.diagonal(c).clamp_min(0).sqrt()
        self.independent = bool(torch.count_nonzero(c - torch.diag(torch.diagonal(c))) == 0)

    @property
    def variance(self) -> torch.Tensor:
        """``diag(Sigma)``: scalar or shape ``(d,)``."""
        return self.scale**2

    def apply_sqrt(self, z: torch.Tensor) -> torch.Tensor:
        """``Sigma^{1/2} z`` for each row of ``z`` ``(paths, d)``."""
        if self.chol is None:
            return z * self._scale_like(z)
        return z @ self._cached("chol_t", lambda: self.chol.T, z)

    def sample(self, paths, d, *, generator=None, dtype=torch.float64, device=None):
        self.check_dim(d)
        z = torch.randn(paths, d, generator=generator, dtype=dtype, device=device)
        return self.apply_sqrt(z)

    def sign_mean(self, grad: torch.Tensor) -> torch.Tensor:
        # Exact per coordinate even for a full Sigma: the marginal of Z_i is N(0, sigma_i^2).
        inv = self._cached("inv_scale", lambda: 1 / (self.scale * math.sqrt(2.0)), grad)
        return torch.erf(grad * inv)

    def with_batch_size(self, batch_size: int) -> GaussianNoise:
        """The noise of a batch of ``batch_size`` samples: ``Sigma_1 / B``."""
        b = check_positive_int("batch_size", batch_size)
        if self.chol is None:
            return GaussianNoise(self.scale / math.sqrt(b))
        return GaussianNoise(cov=self.chol @ self.chol.T / b)

    def __repr__(self) -> str:
        kind = "diag" if self.chol is None else "full"
        return f"GaussianNoise({kind}, dim={self.dim})"


class StudentTNoise(_Noise):
    r"""Heavy-tailed noise ``Z_i = s_i T_i``, ``T_i`` iid standard Student-t with ``nu`` dof.

    ``nu = 1`` is Cauchy noise; for ``nu <= 2`` the variance is infinite, so SGD's SDE does not
    exist but SignSGD's does (its drift only needs ``P(Z_i < -g_i)``).

    Args:
        nu: degrees of freedom, > 0.
        scale: per-coordinate scale ``s_i`` (scalar or shape ``(d,)``), >= 0.

    Raises:
        ValueError: ``nu <= 0`` or a negative / non-finite scale.
    """

    independent = True

    def __init__(self, nu: float, scale: float | torch.Tensor = 1.0) -> None:
        self.nu = check_positive("nu", nu, allow_inf=True)
        if math.isinf(self.nu):
            raise ValueError(f"nu must be finite (use GaussianNoise for nu = inf), got {nu}")
        self.scale = _as_vector("scale", scale, allow_zero=True)

    @property
    def variance(self) -> torch.Tensor:
        """``s_i^2 nu / (nu - 2)`` for ``nu > 2``, ``inf`` otherwise."""
        factor = self.nu / (self.nu - 2) if self.nu > 2 else math.inf
        return self.scale**2 * factor

    def sample(self, paths, d, *, generator=None, dtype=torch.float64, device=None):
        self.check_dim(d)
        z = torch.randn(paths, d, generator=generator, dtype=dtype, device=device)
        chi2 = _chi_square((paths, d), self.nu, generator, dtype, device)
        return z / torch.sqrt(chi2 / self.nu) * self.scale.to(dtype=dtype, device=device)

    def sign_mean(self, grad: torch.Tensor) -> torch.Tensor:
        s = self._scale_like(grad)
        return student_t_sign_mean(grad / s, self.nu)

    def with_batch_size(self, batch_size: int) -> StudentTNoise:
        """Scale ``s / sqrt(B)``: the variance rule ``Sigma_1 / B``, defined only for ``nu > 2``.

        (The mean of ``B`` t-variables is not t-distributed; this keeps the variance, which is
        the convention of the paper's scaling argument. For ``nu <= 2`` there is no variance to
        keep, e.g. the mean of ``B`` Cauchy variables is Cauchy with the same scale.)
        """
        b = check_positive_int("batch_size", batch_size)
        if self.nu <= 2:
            raise ValueError(f"nu must be > 2 for batch-size scaling Sigma_1 / B, got {self.nu}")
        return StudentTNoise(self.nu, self.scale / math.sqrt(b))

    def __repr__(self) -> str:
        return f"StudentTNoise(nu={self.nu}, dim={self.dim})"


def _chi_square(shape, nu: float, generator, dtype, device) -> torch.Tensor:
    """Chi-square(nu) draws; for integer nu, ``-2 sum log U`` over nu // 2 uniforms plus one
    squared normal if nu is odd (cheaper than the general Gamma sampler)."""
    if nu != int(nu) or nu > 64:
        return 2.0 * _standard_gamma(shape, nu / 2, generator, dtype, device)
    k, odd = divmod(int(nu), 2)
    out = torch.zeros(shape, dtype=dtype, device=device)
    if k:
        u = torch.rand((k, *shape), generator=generator, dtype=dtype, device=device)
        out = -2.0 * torch.log1p(-u).sum(0)  # 1 - U lies in (0, 1]: no log(0)
    if odd:
        out = out + torch.randn(shape, generator=generator, dtype=dtype, device=device) ** 2
    return out


def _standard_gamma(shape, a: float, generator, dtype, device) -> torch.Tensor:
    """Gamma(a, 1) draws from ``generator`` (Marsaglia & Tsang 2000; boost ``U^{1/a}`` for a<1)."""
    boost = a < 1
    alpha = a + 1 if boost else a
    d_ = alpha - 1 / 3
    c = 1 / math.sqrt(9 * d_)
    out = torch.empty(shape, dtype=dtype, device=device)
    todo = torch.ones(shape, dtype=torch.bool, device=device)
    while bool(todo.any()):
        n = int(todo.sum())
        x = torch.randn(n, generator=generator, dtype=dtype, device=device)
        u = torch.rand(n, generator=generator, dtype=dtype, device=device)
        v = (1 + c * x) ** 3
        log_v = torch.log(v.clamp_min(1e-300))
        ok = (v > 0) & (torch.log(u) < 0.5 * x**2 + d_ - d_ * v + d_ * log_v)
        idx = todo.nonzero(as_tuple=True)
        sel = tuple(i[ok] for i in idx)
        out[sel] = (d_ * v)[ok]
        todo[sel] = False
    if boost:
        u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
        out = out * u ** (1 / a)
    return out


def _integer_nu_sign_mean(y: torch.Tensor, nu: int) -> torch.Tensor:
    """``2 F_nu(y) - 1`` for integer ``nu`` by the finite series of Abramowitz & Stegun
    26.7.3-4 (``theta = atan(y / sqrt(nu))``, ``c = cos^2 theta``): odd ``nu``:
    ``(2/pi)(theta + sin theta cos theta (1 + (2/3) c + (2*4)/(3*5) c^2 + ...))``;
    even ``nu``: ``sin theta (1 + (1/2) c + (1*3)/(2*4) c^2 + ...)``."""
    theta = torch.atan(y / math.sqrt(nu))
    c = torch.cos(theta) ** 2
    terms = (nu - 1) // 2 if nu % 2 else nu // 2  # number of series terms
    series = torch.ones_like(y)
    coef, power = 1.0, torch.ones_like(y)
    for j in range(1, terms):
        coef *= (2 * j) / (2 * j + 1) if nu % 2 else (2 * j - 1) / (2 * j)
        power = power * c
        series = series + coef * power
    if nu % 2:
        if nu == 1:
            return theta * (2 / math.pi)
        out = (2 / math.pi) * (theta + torch.sin(theta) * torch.cos(theta) * series)
    else:
        out = torch.sin(theta) * series
    return out.clamp(-1, 1)  # rounding must not push |E sign| above 1 (sqrt(1 - m^2))


# 64-point Gauss-Legendre rule on [0, 1], used by the t CDF below.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(64)
_GL_X, _GL_W = (_GL_X + 1) / 2, _GL_W / 2


def student_t_sign_mean(y: torch.Tensor, nu: float) -> torch.Tensor:
    r"""``2 F_nu(y) - 1`` elementwise (``F_nu`` the standard Student-t CDF), any real ``nu > 0``.

    With ``theta = atan(|y| / sqrt(nu))`` and ``c = Gamma((nu+1)/2) / (sqrt(pi) Gamma(nu/2))``,
    ``2F - 1 = sign(y) 2c int_0^theta cos^(nu-1)(phi) dphi``. Integer ``nu <= 64`` use the
    closed-form series (fast); otherwise, for ``theta <= pi/4`` the
    integrand is smooth and a Gauss-Legendre rule is used directly; otherwise the complement
    ``1 - 2c (a^nu / nu) int_0^1 (sin psi / psi)^(nu-1) dw`` with ``a = pi/2 - theta``,
    ``psi = a w^(1/nu)`` removes the endpoint singularity (accurate to ~1e-12 in float64).
    """
    nu = check_positive("nu", nu)
    if nu == int(nu) and nu <= 64:
        return _integer_nu_sign_mean(y, int(nu))
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(math.pi)
    gx = torch.as_tensor(_GL_X, dtype=y.dtype, device=y.device)
    gw = torch.as_tensor(_GL_W, dtype=y.dtype, device=y.device)
    theta = torch.atan(y.abs() / math.sqrt(nu)).unsqueeze(-1)
    direct = 2 * c * theta.squeeze(-1) * (torch.cos(theta * gx) ** (nu - 1) * gw).sum(-1)
    a = (math.pi / 2 - theta).clamp_min(1e-300)
    psi = a * gx ** (1 / nu)
    sinc = torch.where(psi > 0, torch.sin(psi) / psi, torch.ones_like(psi))
    tail = 2 * c * (a.squeeze(-1) ** nu / nu) * (sinc ** (nu - 1) * gw).sum(-1)
    value = torch.where(theta.squeeze(-1) <= math.pi / 4, direct, 1 - tail)
    return torch.sign(y) * value.clamp(0, 1)
