"""Finding the activation modules of MLP blocks and their zero-derivative regions.

An activation ``a = sigma(h)`` (elementwise, ``h`` of any shape ``(..., d_ff)``) is *sparse* at
an entry when ``sigma'(h) = 0`` there (Peng et al., arXiv 2309.03004: "gradient sparsity").
Each supported activation declares that region as a boolean mask of ``h``:

* ``nn.ReLU``, ``JSquaredReLU``, the ReLU/J-SquaredReLU mix: ``h <= 0``;
* ``nn.ReLU6``: ``h <= 0`` or ``h >= 6``; ``nn.Hardtanh``: ``h <= min_val`` or ``h >= max_val``;
* any module with a ``zero_derivative(h) -> BoolTensor`` method (how flatlab's own modules
  declare it, and how a user adds an activation to the default search).

Default discovery keeps exactly those modules. A module named explicitly that declares no
region (GELU, SiLU, a custom one) gets the derivative by autograd on the elementwise map and
counts ``|sigma'(h)| <= deriv_tol`` as zero.

The matmul around an activation is found structurally: the nearest ``nn.Linear`` sibling before
it in its parent's children (the "key" layer ``K``, ``h = K x + b``) and after it (the second
matmul, whose FLOPs a zero output skips). A wrapper with an ``nn.Linear`` ``.inner`` (the
zeroth bias) stands for its Linear.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

Region = Callable[[torch.Tensor], torch.Tensor]

_TORCH_REGIONS: dict[type, Callable[[nn.Module], Region]] = {
    nn.ReLU: lambda m: lambda h: h <= 0,
    nn.ReLU6: lambda m: lambda h: (h <= 0) | (h >= 6),
    nn.Hardtanh: lambda m: lambda h: (h <= m.min_val) | (h >= m.max_val),
}
LOOKED_FOR = "nn.ReLU, nn.ReLU6, nn.Hardtanh and modules with a zero_derivative(h) method"


def known_region(module: nn.Module) -> Region | None:
    """The zero-derivative mask function of ``module``, or None if it declares none."""
    method = getattr(module, "zero_derivative", None)
    if callable(method):
        return method
    for kind, make in _TORCH_REGIONS.items():
        if type(module) is kind:
            return make(module)
    return None


def zero_derivative_below(module: nn.Module) -> float | None:
    """``t`` if the zero-derivative region is exactly ``h <= t`` (ReLU family), else None.

    The probe then counts with a faster kernel than a boolean mask. Modules declare it with a
    ``zero_derivative_below`` attribute (J-SquaredReLU and the ReLU mix: 0).
    """
    value = getattr(module, "zero_derivative_below", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return 0.0 if type(module) is nn.ReLU else None


def zero_output_threshold(module: nn.Module, tol: float) -> float | None:
    """``t`` with ``|sigma(h)| <= tol  <=>  h <= t``, for activations where that holds, else None.

    Lets the probe count zero outputs from ``h`` in its pre-hook (no output hook, one pass
    less): ``nn.ReLU`` gives ``t = tol``; modules may declare ``zero_output_threshold(tol)``.
    """
    method = getattr(module, "zero_output_threshold", None)
    if callable(method):
        return method(tol)
    if type(module) is nn.ReLU:
        return tol
    return None


def autograd_region(module: nn.Module, deriv_tol: float) -> Region:
    """Mask ``|sigma'(h)| <= deriv_tol`` with ``sigma'`` by autograd (elementwise modules)."""

    def region(h: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            leaf = h.detach().clone().requires_grad_(True)
            out = module.forward(leaf * 1.0)  # a non-leaf copy, so in-place modules are fine
            (deriv,) = torch.autograd.grad(out.sum(), leaf)
        return deriv.abs() <= deriv_tol

    return region


def resolve_modules(
    model: nn.Module,
    modules: Iterable[str | nn.Module] | Mapping[str, nn.Module] | None,
) -> dict[str, nn.Module]:
    """Map layer names to activation modules: discovered by default, else the named ones.

    Raises:
        ValueError: a name or module not in ``model``, or no activation found by discovery.
    """
    named = dict(model.named_modules())
    if modules is None:
        found = {n: m for n, m in named.items() if n and known_region(m) is not None}
        if not found and known_region(model) is not None:
            found = {type(model).__name__: model}
        if not found:
            raise ValueError(
                f"no activation module found in {type(model).__name__}: looked for {LOOKED_FOR} "
                "(a functional F.relu inside forward cannot be hooked); pass modules=[names]"
            )
        return found
    by_id = {id(m): n for n, m in named.items()}
    if isinstance(modules, Mapping):
        items = list(modules.items())
    else:
        items = [(None, m) for m in modules]
    if not items:
        raise ValueError("modules must name at least one submodule of model, got an empty list")
    out: dict[str, nn.Module] = {}
    for label, entry in items:
        if isinstance(entry, str):
            if entry not in named:
                avail = ", ".join(repr(n) for n in list(named)[1:12])
                raise ValueError(
                    f"modules must be submodules of model, got {entry!r} (some names: {avail})"
                )
            out[label or entry] = named[entry]
        elif isinstance(entry, nn.Module):
            if id(entry) not in by_id:
                raise ValueError(
                    f"modules must be submodules of model, got a {type(entry).__name__} "
                    "that is not inside it"
                )
            out[label or by_id[id(entry)] or type(model).__name__] = entry
        else:
            raise TypeError(
                f"modules must be names or nn.Module objects, got {type(entry).__name__}"
            )
    return out


def neighbour_linear(model: nn.Module, name: str, after: bool) -> nn.Linear | None:
    """The nearest ``nn.Linear`` sibling after (or before) the submodule ``name``, if any."""
    if "." in name:
        parent_name, child = name.rsplit(".", 1)
    else:
        parent_name, child = "", name
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        return None
    children = list(parent.named_children())
    keys = [k for k, _ in children]
    if child not in keys:
        return None
    i = keys.index(child)
    order = children[i + 1 :] if after else reversed(children[:i])
    for _, m in order:
        inner = getattr(m, "inner", None)  # a wrapper such as ZerothBias counts as its Linear
        if isinstance(m, nn.Linear):
            return m
        if isinstance(inner, nn.Linear):
            return inner
    return None


@contextlib.contextmanager
def backward_measurement(
    model: nn.Module, activations: Iterable[nn.Module], *, eval_mode: bool = True
) -> Iterator[list]:
    """Leave ``model`` as it was around measurements that run backward passes with hooks.

    Inside the block: in-place activations are made out-of-place (their inputs must survive
    for the hooks), the model is in eval mode when ``eval_mode``, and the caller appends its
    hook handles to the yielded list. On exit, also after an error: every handle is removed,
    in-place flags and every module's training flag are restored, and each parameter's
    ``.grad`` is put back as it was before the block.
    """
    modes = [(m, m.training) for m in model.modules()]
    inplace = [(a, a.inplace) for a in activations if getattr(a, "inplace", False)]
    params = list(model.parameters())
    saved = [p.grad for p in params]
    handles: list = []
    try:
        for a, _ in inplace:
            a.inplace = False
        if eval_mode:
            model.eval()
        yield handles
    finally:
        for h in handles:
            h.remove()
        for a, flag in inplace:
            a.inplace = flag
        for m, mode in modes:
            m.training = mode
        for p, g in zip(params, saved):
            p.grad = g


def backward_batch(model: nn.Module, loss_fn: Callable, inputs, targets) -> None:
    """One forward-backward pass of the mean loss on a batch, from cleared gradients."""
    for p in model.parameters():
        p.grad = None
    with torch.enable_grad():
        loss_fn(model(inputs), targets).backward()
