"""Swap the sparsity modules into an existing model, and keep their constraints after each step.

``sparsify(model, ...)`` finds every ``nn.ReLU`` of an MLP block (a ReLU with an ``nn.Linear``
sibling before it, the key layer ``K``, and one after it, the second matmul ``W2``, in its
parent's registration order) and, per block,

* ``activation="jsrelu"`` replaces the ReLU by :class:`JSquaredReLU` (from scratch);
  ``"ramp"`` by :class:`ReLUToJSquaredReLU` with ``k`` ramped over ``ramp_steps`` steps
  (finetuning); ``"keep"`` leaves it;
* ``zeroth_bias="input"`` wraps ``K`` as ``K(x + b0)`` (= ``MLP(LN(x) + b0)`` when ``K`` is the
  block's first op); ``"output"`` wraps ``W2`` as ``W2(a) + b0`` (= ``MLP(LN(x)) + b0`` when
  ``W2`` is its last op); ``b0`` has shape ``(tokens, d)``, ``(d,)``, or, given an
  ``example`` batch, the per-example shape of the tensor it is added to;
* ``layernorm="scratch" | "finetune"`` replaces the LayerNorm in front of the block (the
  nearest ``nn.LayerNorm`` registered before ``K`` in its parent, else before the block in
  the grandparent) by a :class:`RestrictedLayerNorm`.

With ``activation="ramp"``, ``layernorm="finetune"`` (or None) and any zeroth bias, the
sparsified model computes exactly what it computed before, bit for bit, until the first
optimizer step. Build the optimizer **after** ``sparsify`` (new parameters appear) and call
``constrain_(model, step)`` after every optimizer step: it clips zeroth biases, clamps the
restricted LayerNorms and advances the ReLU -> J-SquaredReLU ramps.
"""

from __future__ import annotations

import torch
from torch import nn

from flatlab._checks import check_choice, check_nonnegative, check_positive_int
from flatlab.sparsity._discovery import neighbour_linear
from flatlab.sparsity.modules import (
    LN_MODES,
    PLACEMENTS,
    JSquaredReLU,
    ReLUToJSquaredReLU,
    RestrictedLayerNorm,
    ZerothBias,
)

ACTIVATIONS = ("jsrelu", "ramp", "keep")


def _split(name: str) -> tuple[str, str]:
    return tuple(name.rsplit(".", 1)) if "." in name else ("", name)  # type: ignore[return-value]


def _preceding_norm(model: nn.Module, name: str, key_child: str) -> tuple[str, nn.LayerNorm] | None:
    """Nearest LayerNorm before ``key_child`` in parent ``name``, else before it one level up."""
    parent = model.get_submodule(name)
    children = list(parent.named_children())
    keys = [k for k, _ in children]
    for k, m in reversed(children[: keys.index(key_child)]):
        if isinstance(m, nn.LayerNorm):
            return (f"{name}.{k}" if name else k), m
    if not name:
        return None
    grand, child = _split(name)
    return _preceding_norm(model, grand, child)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, child = _split(name)
    setattr(model.get_submodule(parent), child, module)


def sparsify(
    model: nn.Module,
    *,
    activation: str = "jsrelu",
    zeroth_bias: str | None = None,
    tokens: int | None = None,
    clip: float = 0.1,
    layernorm: str | None = None,
    ramp_steps: int = 1000,
    example: torch.Tensor | None = None,
) -> nn.Module:
    """Swap J-SquaredReLU, zeroth biases and restricted LayerNorms into ``model`` (in place).

    Args:
        model: a network with ReLU MLP blocks.
        activation: "jsrelu" (from scratch), "ramp" (ReLU -> J-SquaredReLU over
            ``ramp_steps``, for finetuning) or "keep".
        zeroth_bias: None, "input" or "output" (see the module docstring).
        tokens: token positions ``T`` of the zeroth bias (shape ``(T, d)``); None for ``(d,)``.
        example: an input batch; if given, each zeroth bias takes the shape of one example's
            tensor at its place (all dims but the batch), overriding ``tokens``. Use it for
            token models (a token-mixing MLP sees ``(B, D, T)``).
        clip: zeroth-bias bound ``|b0| <= clip |gamma|``.
        layernorm: None, "scratch" or "finetune".
        ramp_steps: length of the activation ramp and of the finetuning LayerNorm ramp.

    Returns:
        ``model`` itself, modified.

    Raises:
        ValueError: bad options, no ReLU MLP block, or a block missing what an option needs.
    """
    check_choice("activation", activation, ACTIVATIONS)
    if zeroth_bias is not None:
        check_choice("zeroth_bias", zeroth_bias, PLACEMENTS)
    if layernorm is not None:
        check_choice("layernorm", layernorm, LN_MODES)
    check_nonnegative("clip", clip)
    check_positive_int("ramp_steps", ramp_steps)
    if tokens is not None:
        check_positive_int("tokens", tokens)
    named = dict(model.named_modules())
    blocks = []
    for name, m in named.items():
        if type(m) is not nn.ReLU:
            continue
        key = neighbour_linear(model, name, after=False)
        second = neighbour_linear(model, name, after=True)
        if key is not None and second is not None:
            blocks.append((name, key, second))
    if not blocks:
        raise ValueError(
            f"sparsify found no ReLU MLP block in {type(model).__name__}: looked for an nn.ReLU "
            "with an nn.Linear registered before and after it in the same parent"
        )
    ids = {id(m): n for n, m in named.items()}
    shapes = _leading_shapes(model, blocks, zeroth_bias, example) if zeroth_bias else {}
    replaced: dict[int, RestrictedLayerNorm] = {}
    for name, key, second in blocks:
        parent, _ = _split(name)
        norm_found = _preceding_norm(model, parent, _split(ids[id(key)])[1])
        norm = norm_found[1] if norm_found else None
        if layernorm is not None:
            if norm is None:
                raise ValueError(f"layernorm={layernorm!r} needs a LayerNorm before {name!r}")
            if id(norm) not in replaced:
                new = RestrictedLayerNorm.from_layernorm(norm, layernorm, ramp_steps)
                _set(model, norm_found[0], new)
                replaced[id(norm)] = new
            norm = replaced[id(norm)]
        if activation == "jsrelu":
            _set(model, name, JSquaredReLU())
        elif activation == "ramp":
            _set(model, name, ReLUToJSquaredReLU(ramp_steps))
        if zeroth_bias == "input":
            lead = shapes.get(id(key), tokens)
            wrapped = ZerothBias(key, key.in_features, lead, "input", clip, norm)
            _set(model, ids[id(key)], wrapped)
        elif zeroth_bias == "output":
            lead = shapes.get(id(second), tokens)
            wrapped = ZerothBias(second, second.out_features, lead, "output", clip, norm)
            _set(model, ids[id(second)], wrapped)
    return model


def _leading_shapes(model: nn.Module, blocks: list, placement: str,
                    example: torch.Tensor | None) -> dict[int, tuple[int, ...]]:
    """Per wrapped Linear, the non-batch, non-feature sizes of its input (or output)."""
    if example is None:
        return {}
    targets = [key if placement == "input" else second for _, key, second in blocks]
    found: dict[int, tuple[int, ...]] = {}

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        t = args[0] if placement == "input" else out
        found[id(module)] = tuple(int(s) for s in t.shape[1:-1])

    handles = [m.register_forward_hook(hook) for m in targets]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return {k: (v or None) for k, v in found.items()}


def constrain_(model: nn.Module, step: int) -> None:
    """After optimizer step ``step``: clip zeroth biases, restrict LayerNorms, advance ramps."""
    for m in model.modules():
        if isinstance(m, ZerothBias):
            m.clip_()
        elif isinstance(m, RestrictedLayerNorm):
            m.restrict_(step)
        elif isinstance(m, ReLUToJSquaredReLU):
            m.set_step(step)
