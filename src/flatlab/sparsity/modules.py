"""Plug-and-play modules that raise activation sparsity (Peng et al., arXiv 2309.03004).

**J-SquaredReLU** (same zero set as ReLU, a derivative that jumps from 0 to 1 at 0 and then
grows, so leaving the zero region is rewarded by larger gradients and, under flatness, the
network prefers to stay in it):

.. code-block:: text

    f(h)  = h^2/2 + h = ((h+1)^2 - 1)/2   for h >= 0,   0 otherwise
    f'(h) = (h + 1) 1[h >= 0]
    cap c (optional): f(h) = f(c) + (c+1)(h - c) for h > c (linear continuation)

**ReLU -> J-SquaredReLU mix** for finetuning: ``(1-k) relu(h) + k f(h) = relu(h) + k relu(h)^2/2``
with ``k = min(step / ramp_steps, 1)``; at ``k = 0`` the output is ReLU's, bit for bit.

**Zeroth bias** (the doubly-biased MLP): a trainable ``b0`` of shape ``(T, d)`` (one vector per
token position; ``(d,)`` when ``tokens`` is None, which then folds into the first bias) that
starts at 0 and is added to every sample, either at the MLP input, ``MLP(LN(x) + b0)``
(``placement="input"``, the paper's text and its early code), or at its output,
``MLP(LN(x)) + b0`` (``"output"``, the authors' later code, and the default). After each step
it is clipped elementwise to ``|b0| <= c |gamma|``, ``gamma`` the scale of the LayerNorm before
the MLP (1 when there is none or it has no affine), ``c = 0.1`` by default.

**Restricted LayerNorm** in front of each sparsified MLP: from scratch (``mode="scratch"``) the
bias is removed and ``gamma >= 1`` is enforced after each step; for finetuning
(``mode="finetune"``) the bias is frozen and ``|gamma| >= min(step / ramp_steps, 1)`` with
its sign kept.

**Shifted S-shaped squared ReLU** (the authors' manipulation experiment, target 5 of the note):
a flat band of zero derivative that does *not* contain 0 and on which the output is *not* 0,
so "zero derivative" and "zero output" fall apart:

.. code-block:: text

    s(u)  = relu(u - w)^2 - relu(-u - w)^2              (w = 1.5: flat on [-w, w])
    f(h)  = s(h - shift_x) + shift_y                     (shifts in {+-1.6}: band excludes 0)
    f'(h) = 0  on  |h - shift_x| <= w,   f = shift_y there

Shapes: every module here acts elementwise on ``(..., d)`` tensors; ``ZerothBias`` with
``tokens=T`` expects ``(B, T, d)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flatlab._checks import check_choice, check_nonnegative, check_positive, check_positive_int

PLACEMENTS = ("input", "output")
LN_MODES = ("scratch", "finetune")


def j_squared_relu(h: torch.Tensor, cap: float | None = None) -> torch.Tensor:
    """``h^2/2 + h`` for ``h >= 0`` else 0 (linear above ``cap`` when given)."""
    out = torch.where(h >= 0, 0.5 * h * h + h, torch.zeros_like(h))
    if cap is not None:
        top = 0.5 * cap * cap + cap
        out = torch.where(h > cap, top + (cap + 1.0) * (h - cap), out)
    return out


class JSquaredReLU(nn.Module):
    """J-SquaredReLU activation, ``f(h) = (h^2/2 + h) 1[h >= 0]``; zero-derivative set ``h <= 0``.

    Args:
        cap: if given (> 0), continue linearly above ``h = cap`` (value ``cap^2/2 + cap``,
            slope ``cap + 1``), the authors' guarded variant. Default None.
    """

    zero_derivative_below = 0.0  # the probe's fast path: zero derivative <=> h <= 0

    def __init__(self, cap: float | None = None) -> None:
        super().__init__()
        self.cap = None if cap is None else check_positive("cap", cap)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return j_squared_relu(h, self.cap)

    def zero_derivative(self, h: torch.Tensor) -> torch.Tensor:
        """Mask of the zero-derivative region (``h <= 0``, ReLU's convention)."""
        return h <= 0

    def zero_output_threshold(self, tol: float) -> float:
        """``f(h) <= tol  <=>  h <= sqrt(1 + 2 tol) - 1`` (f is increasing and >= 0)."""
        return math.sqrt(1.0 + 2.0 * tol) - 1.0

    def extra_repr(self) -> str:
        return "" if self.cap is None else f"cap={self.cap}"


class ShiftedSquaredS(nn.Module):
    """``f(h) = s(h - shift_x) + shift_y``, ``s(u) = relu(u - w)^2 - relu(-u - w)^2``.

    The zero-derivative set is the band ``|h - shift_x| <= w``, where ``f = shift_y``. With
    ``|shift_x| > w`` the band excludes ``h = 0``, and with ``shift_y != 0`` the output in it is
    nonzero: a network that moves pre-activations into the band gains *derivative* sparsity
    and no *output* sparsity (Peng et al.'s manipulation experiment, arXiv 2309.03004 v4 §6).

    Args:
        shift_x: horizontal shift of the band's centre.
        shift_y: output on the band.
        width: half-width ``w`` of the band (> 0, default 1.5).

    Example:
        >>> f = ShiftedSquaredS(1.6, -1.6)
        >>> [round(v, 4) for v in f(torch.tensor([1.6, 0.0, 4.1])).tolist()]  # h = 0: off band
        [-1.6, -1.61, -0.6]
    """

    def __init__(self, shift_x: float = 1.6, shift_y: float = 1.6, width: float = 1.5) -> None:
        super().__init__()
        self.shift_x, self.shift_y = float(shift_x), float(shift_y)
        if not (math.isfinite(self.shift_x) and math.isfinite(self.shift_y)):
            raise ValueError(f"shifts must be finite, got ({shift_x}, {shift_y})")
        self.width = check_positive("width", width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = h - self.shift_x
        return torch.relu(u - self.width).square() - torch.relu(-u - self.width).square() + (
            self.shift_y)

    def zero_derivative(self, h: torch.Tensor) -> torch.Tensor:
        """Mask of the flat band ``|h - shift_x| <= width``."""
        return (h - self.shift_x).abs() <= self.width

    def extra_repr(self) -> str:
        return f"shift_x={self.shift_x:g}, shift_y={self.shift_y:g}, width={self.width:g}"


class ReLUToJSquaredReLU(nn.Module):
    """``relu(h) + k relu(h)^2 / 2``: ReLU at ``k = 0`` (exactly), J-SquaredReLU at ``k = 1``.

    ``k`` is the buffer ``mix`` (saved in the state_dict); :meth:`set_step` ramps it as
    ``min(step / ramp_steps, 1)``.

    Args:
        ramp_steps: steps of the linear ramp from 0 to 1 (>= 1).
        mix: the starting ``k`` in ``[0, 1]`` (default 0).
    """

    zero_derivative_below = 0.0

    def __init__(self, ramp_steps: int = 1000, mix: float = 0.0) -> None:
        super().__init__()
        self.ramp_steps = check_positive_int("ramp_steps", ramp_steps)
        self.register_buffer("mix", torch.tensor(self._check_mix(mix)))

    @staticmethod
    def _check_mix(mix: float) -> float:
        mix = check_nonnegative("mix", mix)
        if mix > 1:
            raise ValueError(f"mix must be in [0, 1], got {mix}")
        return mix

    def set_mix(self, mix: float) -> None:
        """Set ``k`` directly."""
        self.mix.fill_(self._check_mix(mix))

    def set_step(self, step: int) -> None:
        """Set ``k = min(step / ramp_steps, 1)``."""
        self.set_mix(min(max(step, 0) / self.ramp_steps, 1.0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        r = torch.relu(h)
        return r + self.mix.to(r.dtype) * (0.5 * r * r)

    def zero_derivative(self, h: torch.Tensor) -> torch.Tensor:
        """Mask of the zero-derivative region (``h <= 0``)."""
        return h <= 0

    def extra_repr(self) -> str:
        return f"ramp_steps={self.ramp_steps}, mix={float(self.mix):.4g}"


class ZerothBias(nn.Module):
    """Wrap a module with a trainable zeroth bias at its input or output.

    ``placement="input"``: ``inner(x + b0)``; ``"output"``: ``inner(x) + b0``. ``b0`` starts at 0,
    so the wrapped module computes exactly what ``inner`` computed. :meth:`clip_` applies
    ``|b0| <= clip * |gamma|``.

    Args:
        inner: the wrapped module (the MLP's first linear layer for "input", its last for
            "output").
        dim: feature size ``d`` of the biased tensor.
        tokens: number of token positions ``T`` (b0 of shape ``(T, d)``), a tuple of leading
            sizes (b0 of shape ``(*tokens, d)``), or None for ``(d,)``.
        placement: "output" (default: ``MLP(LN(x)) + b0``, the authors' final code, when
            ``inner`` is the MLP's last layer) or "input" (``MLP(LN(x) + b0)``, the paper's text
            and their early code).
        clip: the constant ``c`` (>= 0).
        norm: the LayerNorm whose scale bounds b0 (None: ``|gamma| = 1``).
    """

    def __init__(
        self,
        inner: nn.Module,
        dim: int,
        tokens: int | tuple[int, ...] | None = None,
        placement: str = "output",
        clip: float = 0.1,
        norm: nn.LayerNorm | None = None,
    ) -> None:
        super().__init__()
        self.placement = check_choice("placement", placement, PLACEMENTS)
        self.clip = check_nonnegative("clip", clip)
        check_positive_int("dim", dim)
        if tokens is None:
            shape: tuple[int, ...] = (dim,)
        elif isinstance(tokens, int):
            shape = (check_positive_int("tokens", tokens), dim)
        else:
            shape = (*(check_positive_int("tokens", t) for t in tokens), dim)
        self.inner = inner
        ref = next(inner.parameters(), None)
        kw = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
        self.bias0 = nn.Parameter(torch.zeros(shape, **kw))
        self._axis = -1
        if norm is not None and norm.weight is not None:
            size = norm.weight.numel()
            axes = [a for a in range(-1, -len(shape) - 1, -1) if shape[a] == size]
            if not axes:
                raise ValueError(
                    f"norm must have as many features as an axis of the zeroth bias "
                    f"{shape}, got {size}"
                )
            self._axis = axes[0]  # the axis of b0 that gamma scales (last that matches)
        self._norm = (norm,)  # a tuple, so the norm is not registered twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "input":
            return self.inner(x + self.bias0)
        return self.inner(x) + self.bias0

    @torch.no_grad()
    def clip_(self) -> None:
        """Clamp ``b0`` elementwise to ``[-c |gamma|, c |gamma|]``.

        ``gamma`` broadcasts along the last axis of ``b0`` of its size (the channel axis; in a
        token-mixing MLP, whose input is transposed to ``(D, T)``, that is the ``D`` axis).
        """
        norm = self._norm[0]
        if norm is not None and norm.weight is not None:
            bound = self.clip * norm.weight.detach().abs().to(self.bias0.dtype).reshape(-1)
            bound = bound.reshape(bound.shape + (1,) * (-1 - self._axis))
        else:
            bound = torch.full(self.bias0.shape[-1:], self.clip, dtype=self.bias0.dtype,
                               device=self.bias0.device)
        self.bias0.copy_(torch.maximum(torch.minimum(self.bias0, bound), -bound))

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, clip={self.clip}, shape={tuple(self.bias0.shape)}"


class RestrictedLayerNorm(nn.LayerNorm):
    """LayerNorm with the scale kept away from 0 (and the bias removed or frozen).

    ``mode="scratch"``: no bias; :meth:`restrict_` clamps ``gamma >= 1``. ``mode="finetune"``:
    the bias is frozen; :meth:`restrict_` lifts ``|gamma|`` to ``>= min(step / ramp_steps, 1)``
    keeping its sign. Build it from an existing LayerNorm with :meth:`from_layernorm`.
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        eps: float = 1e-5,
        mode: str = "scratch",
        ramp_steps: int = 1000,
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=True)
        self.mode = check_choice("mode", mode, LN_MODES)
        self.ramp_steps = check_positive_int("ramp_steps", ramp_steps)
        if mode == "scratch":
            self.register_parameter("bias", None)
        else:
            self.bias.requires_grad_(False)

    @classmethod
    def from_layernorm(
        cls, norm: nn.LayerNorm, mode: str = "scratch", ramp_steps: int = 1000
    ) -> RestrictedLayerNorm:
        """A restricted copy of ``norm`` with its weight (and, when finetuning, its bias)."""
        new = cls(tuple(norm.normalized_shape), eps=norm.eps, mode=mode, ramp_steps=ramp_steps)
        ref = norm.weight if norm.weight is not None else None
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if norm.weight is not None:
                new.weight.copy_(norm.weight)
            if mode == "finetune" and norm.bias is not None:
                new.bias.copy_(norm.bias)
            elif mode == "finetune":
                new.bias.zero_()
        return new

    @torch.no_grad()
    def restrict_(self, step: int = 0) -> None:
        """Apply the scale constraint of ``mode`` after optimizer step ``step``."""
        if self.mode == "scratch":
            self.weight.clamp_(min=1.0)
            return
        floor = min(max(step, 0) / self.ramp_steps, 1.0)
        sign = torch.where(self.weight >= 0, 1.0, -1.0).to(self.weight.dtype)
        self.weight.copy_(sign * self.weight.abs().clamp(min=floor))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", mode={self.mode!r}, ramp_steps={self.ramp_steps}"
