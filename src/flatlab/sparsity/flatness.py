"""Augmented flatness of the key layers and its identity with activation density.

For a linear layer ``h_t = K x_t + b`` applied to tokens ``t = 1..N`` (rows of the input
flattened to shape ``(N, d)``; ``h`` of shape ``(N, d_ff)``), the *augmented flatness* of the
journal follow-up of Peng et al. (arXiv 2309.03004; "Towards the Connection between
Activation Sparsity and Flat Minima") is

.. code-block:: text

    AF_K = sum_t || dL/dh_t ||^2 * || x_t ||^2  =  sum_t || dL/dK restricted to token t ||_F^2

(the per-token weight gradient ``eta_t x_t^T`` has Frobenius norm ``||eta_t|| ||x_t||``). With
``a = sigma(h)`` and ``g = dL/da`` we have ``eta = g * sigma'(h)``, which vanishes off the
active set ``A = {(t, i): sigma'(h_ti) != 0}``, hence the identity

.. code-block:: text

    density = |A| / (N d_ff) = AF_K / (N d_ff * mean_{(t,i) in A} ||x_t||^2 eta_ti^2)

so at fixed flatness (small AF), larger inputs or larger derivatives force lower density,
i.e. higher sparsity. :func:`augmented_flatness` measures both sides with hooks; ``L`` is the
mean loss over all of ``data`` (a batch of ``n_b`` of ``n`` examples contributes
``(n_b/n) dL_b/dh``). The identity's two sides agree exactly only if the key layer's output
feeds the activation alone; ``identity_gap`` reports their relative difference.

Data-parallel (``distributed=True``): rank ``r`` passes its shard of the data. Every term
above is a sum over tokens of ``||n_b dL_b/dh_t||^2 ||x_t||^2 = ||d(sum of losses)/dh_t||^2
||x_t||^2``, which does not depend on how the tokens are batched (the model is in eval
mode), so the ranks' sums and example counts are added in one all-reduce and every rank gets
the value of the full data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flatlab._batches import Data, batches
from flatlab._ranks import ranks_of
from flatlab.sparsity._discovery import (
    autograd_region,
    backward_batch,
    backward_measurement,
    known_region,
    neighbour_linear,
    resolve_modules,
)
from flatlab.sparsity.probe import Modules

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class AugmentedFlatness:
    """Augmented flatness per key layer and the terms of the density identity.

    Attributes:
        value: key-layer name -> ``AF_K``.
        density: key-layer name -> fraction of ``h`` entries with ``sigma'(h) != 0``.
        active_mean: key-layer name -> mean over active entries of ``||x_t||^2 eta_ti^2``.
        entries: key-layer name -> ``N d_ff``.
        identity_gap: key-layer name -> ``|AF - density N d_ff active_mean| / AF``.
    """

    value: dict[str, float]
    density: dict[str, float]
    active_mean: dict[str, float]
    entries: dict[str, int]
    identity_gap: dict[str, float]


def augmented_flatness(
    model: nn.Module, loss_fn: LossFn, data: Data, modules: Modules = None, *,
    distributed: object = False,
) -> AugmentedFlatness:
    """``AF_K`` of the linear layer before each activation, and its density decomposition.

    Args:
        model: the network (eval mode during the call; restored after).
        loss_fn: ``loss_fn(model(inputs), targets)``, mean-reduced.
        data: a tensor pair, a list of pairs or a DataLoader.
        modules: activation modules (default: discovered); each needs an ``nn.Linear``
            sibling right before it.
        distributed: ``True`` or a process group: every rank passes its own shard of the
            data, the sums are added over the ranks (one all-reduce) and every rank gets the
            full data's values. Every rank must call it.

    Raises:
        ValueError: an activation without a preceding ``nn.Linear``, or empty data.
    """
    ranks = ranks_of(distributed)
    acts = resolve_modules(model, modules)
    names = {id(m): n for n, m in model.named_modules()}
    pairs: dict[str, tuple[nn.Linear, nn.Module]] = {}
    for label, act in acts.items():
        key = neighbour_linear(model, names.get(id(act), label), after=False)
        if key is None:
            raise ValueError(f"modules must follow an nn.Linear in their parent, got {label!r}")
        pairs[names[id(key)]] = (key, act)
    regions = {k: known_region(a) or autograd_region(a, 0.0) for k, (_, a) in pairs.items()}
    zero = {"af": 0.0, "act_sum": 0.0, "active": 0, "entries": 0}
    acc = {k: dict(zero) for k in pairs}
    store: dict[str, dict[str, torch.Tensor]] = {k: {} for k in pairs}
    scale = {"n": 1.0}

    def key_fwd(k: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach()
            store[k]["xsq"] = (x.reshape(-1, x.shape[-1]).double() ** 2).sum(1)
            if out.requires_grad:
                out.register_hook(key_back(k))

        return hook

    def act_pre(k: str):
        def hook(module: nn.Module, args: tuple) -> None:
            h = args[0].detach()
            store[k]["active"] = ~regions[k](h).reshape(-1, h.shape[-1])

        return hook

    def key_back(k: str):
        def hook(grad_h: torch.Tensor) -> None:
            eta = grad_h.detach().double()
            eta = eta.reshape(-1, eta.shape[-1]) * scale["n"]
            terms = store[k]["xsq"].unsqueeze(1) * eta**2  # (N, d_ff)
            active = store[k]["active"]
            a = acc[k]
            a["af"] += float(terms.sum())
            a["act_sum"] += float(terms[active].sum())
            a["active"] += int(active.sum())
            a["entries"] += active.numel()

        return hook

    n_total = 0
    with backward_measurement(model, [a for _, a in pairs.values()]) as handles:
        for k, (key, act) in pairs.items():
            handles.append(key.register_forward_hook(key_fwd(k)))
            handles.append(act.register_forward_pre_hook(act_pre(k)))
        for inputs, targets, n in batches(data):
            scale["n"] = float(n)  # n_b dL_b/dh; divided by the total n at the end
            n_total += n
            backward_batch(model, loss_fn, inputs, targets)
    if ranks is not None:
        keys = list(acc)
        sums = torch.tensor([[acc[k][f] for f in zero] for k in keys] + [[n_total, 0, 0, 0]],
                            dtype=torch.float64)
        sums = ranks.sum(sums.to(ranks.device)).cpu()
        for k, row in zip(keys, sums.tolist()):
            acc[k] = {"af": row[0], "act_sum": row[1], "active": int(row[2]),
                      "entries": int(row[3])}
        n_total = int(sums[-1, 0])
    value, density, mean, entries, gap = {}, {}, {}, {}, {}
    for k, a in acc.items():
        value[k] = a["af"] / n_total**2
        density[k] = a["active"] / a["entries"]
        mean[k] = a["act_sum"] / n_total**2 / max(a["active"], 1)
        entries[k] = a["entries"]
        rhs = density[k] * entries[k] * mean[k]
        gap[k] = abs(value[k] - rhs) / value[k] if value[k] > 0 else abs(rhs)
    return AugmentedFlatness(value, density, mean, entries, gap)
