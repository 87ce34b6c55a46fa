"""Gradient sparsity: how many entries of ``dL/dh`` vanish at each MLP activation.

For ``a = sigma(h)`` with upstream gradient ``g = dL/da`` the gradient reaching the
pre-activation is ``eta = dL/dh = g * sigma'(h)`` (shapes ``(..., d_ff)``). Peng et al., arXiv
2309.03004, argue that flat minima force ``||eta||`` small and that, behind a LayerNorm, the
cheap way is ``sigma'(h) = 0``: "gradient sparsity". Per layer ``l`` and threshold ``p``:

.. code-block:: text

    frac_l(p)        = #{ entries with |eta| < p } / #{ entries }
    derivative_l     = #{ entries with sigma'(h) = 0 } / #{ entries }   (zeros caused by sigma')
    l1_per_token_l   = mean over tokens of ||eta_t||_1,   l2sq_per_token_l = ... ||eta_t||_2^2

``eta`` is the gradient of the **per-example** loss: the loss is mean-reduced over a batch of
``n`` examples, so the hook rescales ``dL/dh`` by ``n`` (thresholds then do not depend on the
batch size). Batches are weighted by their number of entries. The backward hook
(``register_full_backward_hook``) sees the gradient with respect to the activation's own input;
``inplace`` activations are switched to out-of-place during the call and restored afterwards,
as are every module's mode (eval by default) and every hook.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flatlab._batches import Data, batches
from flatlab._checks import check_positive
from flatlab.sparsity._discovery import (
    autograd_region,
    backward_batch,
    backward_measurement,
    known_region,
    resolve_modules,
)
from flatlab.sparsity.probe import Modules

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GradientSparsity:
    """Per-layer fractions of small pre-activation gradients.

    Attributes:
        thresholds: the thresholds ``p``, ascending.
        per_layer: layer name -> {p: fraction of entries with ``|eta| < p``}.
        mean: {p: mean over layers of that fraction}.
        derivative: layer name -> fraction of entries with ``sigma'(h) = 0``.
        l1_per_token: layer name -> mean over tokens of ``||eta_t||_1``.
        l2sq_per_token: layer name -> mean over tokens of ``||eta_t||_2^2``.
        entries: layer name -> number of entries counted.
    """

    thresholds: tuple[float, ...]
    per_layer: dict[str, dict[float, float]]
    mean: dict[float, float]
    derivative: dict[str, float]
    l1_per_token: dict[str, float]
    l2sq_per_token: dict[str, float]
    entries: dict[str, int]


def gradient_sparsity(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    modules: Modules = None,
    *,
    thresholds: Sequence[float] = (1e-9, 1e-6, 1e-3),
    train_mode: bool = False,
) -> GradientSparsity:
    """Fractions of ``|dL/dh| < p`` per activation layer over ``data`` (one backward per batch).

    Args:
        model: the network, called as ``model(inputs)``.
        loss_fn: ``loss_fn(model(inputs), targets)``, a mean-reduced scalar.
        data: a tensor pair, a list of pairs or a DataLoader.
        modules: activation modules (names, modules or label -> module); default: discovered.
        thresholds: the ``p`` values (each > 0).
        train_mode: keep the model's mode instead of switching to eval.

    Returns:
        A :class:`GradientSparsity`. Parameter ``.grad`` fields are left as they were.

    Raises:
        ValueError: a bad threshold, empty data, a module not in the model or none found.
    """
    ps = tuple(sorted(check_positive("thresholds", p) for p in thresholds))
    if not ps:
        raise ValueError("thresholds must hold at least one value, got ()")
    acts = resolve_modules(model, modules)
    regions = {n: known_region(m) or autograd_region(m, 0.0) for n, m in acts.items()}
    counts = {n: torch.zeros(len(ps), dtype=torch.float64) for n in acts}
    deriv = {n: 0.0 for n in acts}
    l1 = {n: 0.0 for n in acts}
    l2 = {n: 0.0 for n in acts}
    entries = {n: 0 for n in acts}
    tokens = {n: 0 for n in acts}
    state = {"n": 1}
    p_tensor = torch.tensor(ps, dtype=torch.float64)

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            h = args[0].detach()
            deriv[name] += float(regions[name](h).sum())

        return hook

    def back_hook(name: str):
        def hook(module: nn.Module, grad_in: tuple, grad_out: tuple) -> None:
            eta = grad_in[0]
            if eta is None:
                return
            eta = eta.detach().double() * state["n"]
            flat = eta.reshape(-1, eta.shape[-1]) if eta.dim() > 0 else eta.reshape(1, 1)
            mag = flat.abs().reshape(-1)
            counts[name] += (mag.unsqueeze(1) < p_tensor).sum(0).double()
            entries[name] += mag.numel()
            tokens[name] += flat.shape[0]
            l1[name] += float(flat.abs().sum())
            l2[name] += float((flat**2).sum())

        return hook

    with backward_measurement(model, acts.values(), eval_mode=not train_mode) as handles:
        for name, m in acts.items():
            handles.append(m.register_forward_pre_hook(pre_hook(name)))
            handles.append(m.register_full_backward_hook(back_hook(name)))
        for inputs, targets, n in batches(data):
            state["n"] = n
            backward_batch(model, loss_fn, inputs, targets)
    missing = [n for n, e in entries.items() if e == 0]
    if missing:
        raise RuntimeError(f"no gradient reached the activations {missing}")
    per_layer = {n: dict(zip(ps, (counts[n] / entries[n]).tolist())) for n in acts}
    return GradientSparsity(
        thresholds=ps,
        per_layer=per_layer,
        mean={p: sum(per_layer[n][p] for n in acts) / len(acts) for p in ps},
        derivative={n: deriv[n] / entries[n] for n in acts},
        l1_per_token={n: l1[n] / tokens[n] for n in acts},
        l2sq_per_token={n: l2[n] / tokens[n] for n in acts},
        entries=entries,
    )
