"""Activation sparsity: the fraction of MLP pre-activations in the zero-derivative region.

For an MLP block ``a = sigma(h)``, ``h = K x + b`` with ``h`` of shape ``(..., d_ff)`` (e.g.
``(B, d_ff)`` for an MLP, ``(B, T, d_ff)`` for a token model), the probe counts over **all
entries** (samples x tokens x units) seen on the data

.. code-block:: text

    sparsity_l     = #{ entries of h with sigma'(h) = 0 } / #{ entries of h }   (zero derivative)
    zero_output_l  = #{ entries of a with |a| <= output_tol } / #{ entries of a }
    mean           = (1/L) sum_l sparsity_l

which is the convention of Peng, Qi, Shi, Gao, "A Theoretical Explanation of Activation
Sparsity through Flat Minima and Adversarial Robustness", arXiv 2309.03004 (the "lazy
neuron" numbers of Li et al., arXiv 2210.06313, report ``1 - zero_output`` per token). Counts
add over batches, so batches of unequal size are weighted by their number of entries.
With ``per_position=True`` and ``h`` of shape ``(B, T, ..., d_ff)`` it also keeps the fraction
per position ``t`` (dimension 1).

Potential savings: every zero entry of ``a`` skips one row of the next ``nn.Linear`` (the
block's second matmul ``W2 a``, ``W2`` of shape ``(d_out, d_ff)``), i.e. ``2 d_out`` FLOPs;
the dense cost is ``2 d_out`` per entry. ``flop_savings = sum_l 2 d_out_l Z_l / sum_l 2 d_out_l
N_l`` over layers whose second matmul was found.

The probe streams: forward hooks only add up counts, nothing is stored. For activations with
``|sigma(h)| <= tol <=> h <= t`` (ReLU: ``t = tol``; J-SquaredReLU: ``t = sqrt(1 + 2 tol) - 1``)
zero outputs are counted from ``h`` in the pre-hook, so there is no output hook.
``activation_sparsity`` runs under ``torch.no_grad``, puts the model in eval mode
(``train_mode=True`` keeps it as is), and restores every module's mode and removes every hook
in a ``finally`` block.
:class:`SparsityProbe` is the same probe as a context manager for a user's own loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flatlab._batches import Data, batches
from flatlab._checks import check_nonnegative, check_positive_int
from flatlab._ranks import ranks_of
from flatlab.sparsity._discovery import (
    autograd_region,
    known_region,
    neighbour_linear,
    resolve_modules,
    zero_derivative_below,
    zero_output_threshold,
)

Modules = Iterable[str | nn.Module] | Mapping[str, nn.Module] | None


@dataclass(frozen=True)
class SparsityResult:
    """Activation sparsity of each probed layer over the data.

    Attributes:
        mean: mean over layers of the zero-derivative fraction.
        per_layer: layer name -> fraction of pre-activations with ``sigma'(h) = 0``.
        zero_output: layer name -> fraction of outputs with ``|a| <= output_tol``.
        mean_zero_output: mean over layers of ``zero_output``.
        entries: layer name -> number of pre-activation entries counted.
        n_examples: number of examples (leading dimension) seen.
        per_position: layer name -> per-position fractions (``per_position=True`` and ``h``
            with >= 3 dims), else None.
        second_matmul_flops: layer name -> dense FLOPs of the next ``nn.Linear`` on the data.
        skippable_flops: layer name -> FLOPs of it that the zero outputs would skip.
        flop_savings: skippable over dense FLOPs over layers with a found second matmul, or
            None if none was found.
    """

    mean: float
    per_layer: dict[str, float]
    zero_output: dict[str, float]
    mean_zero_output: float
    entries: dict[str, int]
    n_examples: int
    per_position: dict[str, tuple[float, ...]] | None
    second_matmul_flops: dict[str, int]
    skippable_flops: dict[str, int]
    flop_savings: float | None


def _count_le(h: torch.Tensor, t: float) -> torch.Tensor:
    """``#{h <= t}``; via ``sign`` (about 2x faster than a boolean mask on CPU) when exact.

    ``sign(h - t)`` clamped at 0 is 1 exactly where ``h > t``; its float sum is exact while
    the count stays below 2^24, hence the size and dtype guard.
    """
    if h.dtype in (torch.float32, torch.float64) and h.numel() < 2**24:
        s = torch.sign(h - t) if t != 0 else torch.sign(h)
        return h.numel() - s.clamp_(min=0).sum()
    return torch.count_nonzero(h <= t)


def _count(total: torch.Tensor | int) -> float:
    """A count accumulated as a tensor, as a float (NaN if NaN activations poisoned it)."""
    value = float(total)
    return float(round(value)) if math.isfinite(value) else value


class _Counter:
    """Running counts for one layer (tensors, so no device sync per batch)."""

    def __init__(self) -> None:
        self.entries = 0
        self.zero_deriv: torch.Tensor | int = 0
        self.zero_out: torch.Tensor | int = 0
        self.pos_zero: torch.Tensor | None = None
        self.pos_entries: torch.Tensor | None = None


class SparsityProbe:
    """Forward hooks counting zero-derivative and zero-output entries of activation modules.

    Use as a context manager around any forward passes (the model's mode and grad state are
    left to the caller), then read :meth:`result`::

        with SparsityProbe(model) as probe:
            for x, y in loader:
                model(x)
        print(probe.result().per_layer)

    Args:
        model: the network.
        modules: activation modules to probe: names, module objects or a mapping label ->
            module. Default: every ``nn.ReLU``/``ReLU6``/``Hardtanh`` and every module with a
            ``zero_derivative`` method (J-SquaredReLU and the ReLU mix of
            :mod:`flatlab.sparsity.modules`).
        output_tol: an output counts as zero when ``|a| <= output_tol`` (default 0: exactly
            zero; the authors log ``1e-6``).
        deriv_tol: for named modules without a declared region, ``|sigma'(h)| <= deriv_tol``
            (by autograd) counts as zero derivative (default 0).
        per_position: also count per position along dimension 1 of ``h``.

    Raises:
        ValueError: a module not in ``model``, or none found by discovery.
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Modules = None,
        *,
        output_tol: float = 0.0,
        deriv_tol: float = 0.0,
        per_position: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.output_tol = check_nonnegative("output_tol", output_tol)
        deriv_tol = check_nonnegative("deriv_tol", deriv_tol)
        self.model = model
        self.modules = resolve_modules(model, modules)
        self.per_position = bool(per_position)
        self._regions = {
            n: known_region(m) or autograd_region(m, deriv_tol) for n, m in self.modules.items()
        }
        self._below = {n: zero_derivative_below(m) for n, m in self.modules.items()}
        self._out_thresholds = {
            n: zero_output_threshold(m, self.output_tol) for n, m in self.modules.items()
        }
        self._d_out: dict[str, int] = {}
        for name, module in self.modules.items():
            label_name = next((k for k, v in model.named_modules() if v is module), name)
            nxt = neighbour_linear(model, label_name, after=True)
            if nxt is not None:
                self._d_out[name] = nxt.out_features
        self._handles: list[Any] = []
        self.reset()

    # hooks ---------------------------------------------------------------------------
    def _pre_hook(self, name: str):
        region = self._regions[name]
        counter = self._counters[name]
        out_threshold = self._out_thresholds[name]
        below = self._below[name]

        def hook(module: nn.Module, args: tuple) -> None:
            h = args[0].detach()
            counter.entries += h.numel()
            if below is not None and not (self.per_position and h.dim() >= 3):
                counter.zero_deriv = counter.zero_deriv + _count_le(h, below)
            else:
                mask = region(h)
                counter.zero_deriv = counter.zero_deriv + torch.count_nonzero(mask)
            if out_threshold is not None and out_threshold == below:
                counter.zero_out = counter.zero_deriv  # same set: ReLU family at output_tol=0
            elif out_threshold is not None:  # zero outputs read off h: no output hook needed
                counter.zero_out = counter.zero_out + _count_le(h, out_threshold)
            if self.per_position and h.dim() >= 3:
                dims = [d for d in range(h.dim()) if d != 1]
                zeros = mask.sum(dim=dims)
                n_pos = torch.full_like(zeros, h.numel() // h.shape[1])
                if counter.pos_zero is None or counter.pos_zero.shape != zeros.shape:
                    counter.pos_zero, counter.pos_entries = zeros, n_pos
                else:
                    counter.pos_zero = counter.pos_zero + zeros
                    counter.pos_entries = counter.pos_entries + n_pos

        return hook

    def _hook(self, name: str):
        counter = self._counters[name]
        tol = self.output_tol

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            counter.zero_out = counter.zero_out + torch.count_nonzero(out.detach().abs() <= tol)

        return hook

    def attach(self) -> SparsityProbe:
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            if self._out_thresholds[name] is None:
                self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def detach(self) -> None:
        """Remove every hook this probe registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget the counts (hooks stay attached)."""
        self._counters = {n: _Counter() for n in self.modules}
        self.n_examples = 0

    def __enter__(self) -> SparsityProbe:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # result --------------------------------------------------------------------------
    def result(self, distributed: Any = False) -> SparsityResult:
        """The fractions counted since the last :meth:`reset`.

        Args:
            distributed: ``True`` or a process group: every rank ran its own shard of the
                data through the probe; the counts are summed over the ranks (one
                all-reduce, two with ``per_position``), so every rank gets the fractions over
                all the data. Every rank must call it.

        Raises:
            RuntimeError: if no forward pass went through a probed module (on any rank).
            ValueError: ``per_position`` counts of different lengths on the ranks.
        """
        ranks = ranks_of(distributed)
        names = list(self._counters)
        counts = torch.tensor(
            [[float(c.entries), _count(c.zero_deriv), _count(c.zero_out)]
             for c in self._counters.values()] + [[float(self.n_examples), 0.0, 0.0]],
            dtype=torch.float64)
        positions = {n: (c.pos_zero, c.pos_entries) for n, c in self._counters.items()
                     if c.pos_zero is not None}
        if ranks is not None:
            counts = ranks.sum(counts.to(ranks.device)).cpu()
            if self.per_position:
                positions = _sum_positions(ranks, positions, names)
        empty = [n for n, row in zip(names, counts) if row[0] == 0]
        if empty:
            raise RuntimeError(
                f"no activation passed through {empty} since the probe was reset: "
                "run forward passes inside the probe first"
            )
        per_layer, zero_out, entries, per_pos = {}, {}, {}, {}
        dense, skip = {}, {}
        for name, (n_entries, zero_d, zero_o) in zip(names, counts.tolist()):
            per_layer[name] = zero_d / n_entries
            zero_out[name] = zero_o / n_entries
            entries[name] = int(n_entries)
            if name in positions:
                pz, pe = positions[name]
                per_pos[name] = tuple((pz.double() / pe.double()).tolist())
            if name in self._d_out:
                dense[name] = 2 * self._d_out[name] * int(n_entries)
                skip[name] = 2 * self._d_out[name] * zero_o
        n = len(per_layer)
        return SparsityResult(
            mean=sum(per_layer.values()) / n,
            per_layer=per_layer,
            zero_output=zero_out,
            mean_zero_output=sum(zero_out.values()) / n,
            entries=entries,
            n_examples=int(counts[-1, 0]),
            per_position=per_pos if self.per_position else None,
            second_matmul_flops=dense,
            skippable_flops=skip,
            flop_savings=sum(skip.values()) / sum(dense.values()) if dense else None,
        )


def _sum_positions(ranks: Any, positions: dict, names: list[str]) -> dict:
    """Per-position counts summed over the ranks; every rank must have the same lengths."""
    lengths = torch.tensor([len(positions[n][0]) if n in positions else 0 for n in names],
                           dtype=torch.float64)
    ranks.check_same("the per-position lengths", lengths,
                     "give every rank sequences of the same length")
    kept = [n for n in names if n in positions]
    if not kept:
        return positions
    flat = torch.cat([torch.cat([positions[n][0].double().cpu(), positions[n][1].double().cpu()])
                      for n in kept])
    flat = ranks.sum(flat.to(ranks.device)).cpu()
    out, start = {}, 0
    for n in kept:
        t = len(positions[n][0])
        out[n] = (flat[start:start + t], flat[start + t:start + 2 * t])
        start += 2 * t
    return out


def activation_sparsity(
    model: nn.Module,
    data: Data,
    modules: Modules = None,
    *,
    output_tol: float = 0.0,
    deriv_tol: float = 0.0,
    per_position: bool = False,
    train_mode: bool = False,
    max_batches: int | None = None,
    distributed: Any = False,
) -> SparsityResult:
    """Zero-derivative and zero-output fractions of the activations of ``model`` over ``data``.

    Args:
        model: the network; called as ``model(inputs)``.
        data: a tensor pair ``(inputs, targets)``, a list of pairs or a DataLoader.
        modules: which activation modules (see :class:`SparsityProbe`); default: discovered.
        output_tol: ``|a| <= output_tol`` counts as a zero output (default 0).
        deriv_tol: threshold on ``|sigma'(h)|`` for named modules without a declared region.
        per_position: also report fractions per position (dimension 1 of ``h``).
        train_mode: measure in the model's current mode instead of eval mode.
        max_batches: stop after this many batches (default: all; per rank).
        distributed: ``True`` or a process group: every rank passes its own shard of the
            data and the counts are summed over the ranks (see :meth:`SparsityProbe.result`);
            the model may be wrapped in DDP or FSDP2 (only its forward pass runs).

    Returns:
        A :class:`SparsityResult`; ``.mean`` and ``.per_layer`` are the zero-derivative
        fractions.

    Raises:
        ValueError: empty data, a module not in the model, or no activation found.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> r = activation_sparsity(net, (torch.randn(16, 4), torch.zeros(16)))
        >>> list(r.per_layer)
        ['1']
    """
    if max_batches is not None:
        check_positive_int("max_batches", max_batches)
    ranks = ranks_of(distributed)
    probe = SparsityProbe(
        model, modules, output_tol=output_tol, deriv_tol=deriv_tol, per_position=per_position
    )
    modes = [(m, m.training) for m in model.modules()]
    try:
        if not train_mode:
            model.eval()
        probe.attach()
        with torch.no_grad():
            for i, (inputs, _, n) in enumerate(batches(data)):
                if max_batches is not None and i >= max_batches:
                    break
                model(inputs)
                probe.n_examples += n
        return probe.result(ranks)
    finally:
        probe.detach()
        for m, mode in modes:
            m.training = mode
