"""What every Krylov eigensolver of flatlab.curvature shares (Lanczos, power iteration,
block Lanczos): the result type and the small helpers for start vectors, working precision,
default tolerance, eigenvalue selection and re-orthogonalization. Kept apart so that the
solvers and the ``top_eigenvalues`` dispatcher import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_WHICH = ("largest", "smallest", "magnitude")


@dataclass(frozen=True)
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        values: eigenvalues, shape ``(k,)``: descending for ``"largest"``, ascending for
            ``"smallest"``, by descending magnitude for ``"magnitude"``.
        vectors: unit eigenvectors as columns, shape ``(n, k)``.
        residuals: ``||A v_i - lambda_i v_i||``, shape ``(k,)``.
        n_matvecs: operator products used.
        converged: every residual met the tolerance.
        which, method: what was asked for and how it was computed.
        start: the start: ``"gradient"`` (Lanczos only: the loss gradient mixed with a
            random vector), ``"random"``, or ``"given"`` (``init`` was a vector or result).
    """

    values: torch.Tensor
    vectors: torch.Tensor
    residuals: torch.Tensor
    n_matvecs: int
    converged: bool
    which: str
    method: str
    start: str = "random"

    @property
    def value(self) -> float:
        """The first eigenvalue, as a float (``lambda_max`` for ``which="largest"``)."""
        return float(self.values[0])


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else max(1e-4, 10 * torch.finfo(dtype).eps)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The basis is kept in float32 at least (bf16/fp16 bases lose orthogonality at once)."""
    return dtype if dtype == torch.float64 else torch.float32


def _start(n, k, init, dtype, device, seed) -> torch.Tensor:
    if isinstance(init, str):  # lanczos resolves its named starts before calling this
        raise ValueError(f"init={init!r}: a start by name ('gradient', 'random') is Lanczos's "
                         f"(method='lanczos', block_size=1); pass a vector (n,) here")
    if isinstance(init, EigenResult):
        init = init.vectors
    if init is not None:
        if not isinstance(init, torch.Tensor) or init.shape[0] != n or init.dim() not in (1, 2):
            got = tuple(init.shape) if isinstance(init, torch.Tensor) else type(init).__name__
            raise ValueError(f"init must have shape (n,) or (n, m) with n={n}, got {got}")
        v = init.detach().to(device=device, dtype=dtype)
        if v.dim() == 2:  # a combination of all given directions
            v = (v / v.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)).sum(dim=1)
        if torch.isfinite(v).all() and v.norm() > 0:
            return v / v.norm()
    g = torch.Generator().manual_seed(0 if seed is None else int(seed))
    v = torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return v / v.norm()


def _select(theta: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of Ritz values in the order they are wanted."""
    if which == "largest":
        return torch.argsort(theta, descending=True)
    if which == "smallest":
        return torch.argsort(theta)
    return torch.argsort(theta.abs(), descending=True)


def _orthogonalize(w: torch.Tensor, Q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classical Gram-Schmidt twice against the columns of Q; returns (w, coefficients)."""
    h = Q.T @ w
    w = w - Q @ h
    h2 = Q.T @ w
    return w - Q @ h2, h + h2
