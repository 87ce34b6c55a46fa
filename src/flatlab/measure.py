"""``flatlab measure``: the curvature of a saved model, from a checkpoint or a run folder.

The checkpoint is a file written by :mod:`flatlab.train`, or a run folder (its
``checkpoints/<tag>/latest.pt``). Its ``"model"`` entry is a ``state_dict``, or a pickled
``nn.Module``. A state dict does not say how to build the network, so the model then comes
from ``model="package.module:function"``, a function called with no arguments that returns
the ``nn.Module``. Data comes from ``data="package.module:function"``, which returns an
``(x, y)`` pair, a list of pairs, a DataLoader, a ``TensorDataset``, or a split object whose
``.train`` is one of those.

Quantities (``what``), all on the full data, in eval mode, the model untouched:

* ``eig``: the ``k`` largest Hessian eigenvalues (Lanczos), ``lambda_1`` ... ``lambda_k``,
  and ``eig_start``, the start vector (``"gradient"``: the loss gradient mixed with a random
  vector; see :func:`~flatlab.curvature.lanczos`);
* ``trace``: ``tr(H)`` by the default ``method="auto"`` (``trace``, ``trace_stderr``, and
  ``trace_method``, the route taken: ``"gauss_newton"`` or ``"xtrace"``);
* ``density``: SLQ spectral density, summarized by its support (``density_min``,
  ``density_max``) and the first two moments (``density_m1``, ``density_m2``); from
  :func:`measure_checkpoint` it is also drawn into the run folder, ``plots/density.png``
  (``density_plot``: its path);
* ``sharpness``: worst-case L2 sharpness, adaptive L-infinity sharpness, first-order flatness
  and the gradient norm at radius ``rho``.

Each quantity also reports ``<name>_converged`` (1 or 0). ``max_matvecs`` bounds each quantity
on its own, and ``max_seconds`` bounds the whole measurement (see :func:`measure`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flatlab import curvature
from flatlab._checks import check_choice, check_positive, check_positive_int
from flatlab.experiments import load_factory
from flatlab.train import ConfigError, load_checkpoint

QUANTITIES = ("eig", "trace", "density", "sharpness")


def find_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """Resolve a checkpoint file, or a run folder's ``checkpoints/<tag>/latest.pt``.

    Raises:
        FileNotFoundError: nothing there.
        ConfigError: a run folder with several tags and no ``tag`` chosen.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint does not exist: {path}")
    found = sorted(path.glob("checkpoints/*/latest.pt")) or sorted(path.glob("*/latest.pt"))
    if tag:
        found = [p for p in found if p.parent.name == tag]
    if not found:
        raise FileNotFoundError(f"no checkpoints/<tag>/latest.pt under {path}"
                                + (f" for tag {tag!r}" if tag else ""))
    if len(found) > 1:
        tags = ", ".join(p.parent.name for p in found)
        raise ConfigError(f"tag must be one of {tags} (several checkpoints in {path})")
    return found[0]


def load_model(checkpoint: str | Path, model: str = "", tag: str | None = None) -> nn.Module:
    """The model of a checkpoint: pickled in it, or built by ``model`` and loaded."""
    path = find_checkpoint(checkpoint, tag)
    try:
        payload = load_checkpoint(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is one user-facing line
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"not a readable checkpoint: {path} ({why})") from None
    state = payload.get("model") if isinstance(payload, dict) else payload
    if isinstance(state, nn.Module):
        return state
    if not model:
        raise ConfigError("model must be given as 'package.module:function' when the "
                          "checkpoint holds a state_dict, got ''")
    net = load_factory(model, "model")()
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model factory must return an nn.Module, got {type(net).__name__}")
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(f"model does not match the checkpoint: {exc}") from exc
    return net


def load_data(data: str) -> Any:
    """Call the data factory and return something :mod:`flatlab.curvature` accepts."""
    if not data:
        raise ConfigError("data must be given as 'package.module:function', got ''")
    out = load_factory(data, "data")()
    if hasattr(out, "train"):
        out = out.train
    if isinstance(out, torch.utils.data.TensorDataset):
        out = tuple(out.tensors[:2])
    return out


def measure(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    what: Sequence[str] = QUANTITIES,
    *,
    k: int = 5,
    rho: float = 0.05,
    probes: int = 99,
    steps: int = 80,
    seed: int = 0,
    tol: float | None = None,
    stop: str = "residual",
    max_matvecs: int | None = None,
    max_seconds: float | None = None,
    density_plot: str | Path | None = None,
    progress: Any = True,
) -> dict[str, float | str]:
    """Measure the chosen quantities; returns a flat ``{name: value}`` dict.

    ``tol`` and ``stop``: the eigenvalues' tolerance and stopping rule
    (:func:`~flatlab.curvature.top_eigenvalues`). ``probes``: the trace's products.
    ``steps``: the density's Lanczos steps. Budgets:

    * ``max_matvecs`` bounds each quantity on its own: Hessian-vector products for the
      eigenvalues, trace and density, and loss evaluations for each sharpness measure.
    * ``max_seconds`` bounds the whole measurement. Each quantity, in the order of
      ``QUANTITIES``, gets the time that is left. A quantity that starts with no time left
      is skipped. It is reported as not measured (``<name>_converged = 0``, no value), and
      nothing is estimated in its place.

    Every measured quantity reports ``<name>_converged``, 1 or 0. 0 means a budget cut it
    short and the value is the partial result.

    The trace is ``hessian_trace``'s default, ``"auto"``: exact by the Gauss-Newton route
    where it applies, XTrace otherwise; ``trace_method`` names the one taken.

    ``density_plot``: a PNG path for the spectral density (:func:`~flatlab.curvature.
    plot_density`); its parent folder is created. ``progress``: bars on a terminal.
    """
    unknown = [w for w in what if w not in QUANTITIES]
    if unknown or not what:
        raise ConfigError(f"what must be a comma list of {', '.join(QUANTITIES)}, got "
                          f"{','.join(what)!r}")
    if max_matvecs is not None:
        max_matvecs = _checked("max_matvecs", check_positive_int, max_matvecs)
    if max_seconds is not None:
        max_seconds = _checked("max_seconds", check_positive, max_seconds)
    if tol is not None:
        tol = _checked("tol", check_positive, tol)
    stop = _checked("stop", lambda name, v: check_choice(name, v, ("residual", "value")), stop)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds

    def budget() -> dict[str, Any]:
        # what is left, kept positive: out_of_time() has just said some is
        left = None if deadline is None else max(deadline - time.monotonic(), 1e-3)
        return {"max_matvecs": max_matvecs, "max_seconds": left, "progress": progress}

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    out: dict[str, float | str] = {}
    op = curvature.hessian_operator(model, loss_fn, data)
    trace_products = 0  # the trace runs on the model (its own operator or passes)
    for quantity in QUANTITIES:
        if quantity not in what:
            continue
        if out_of_time():
            out[f"{quantity}_converged"] = 0.0
            continue
        if quantity == "eig":
            res = curvature.top_eigenvalues(op, min(k, op.shape[0]), seed=seed, tol=tol,
                                            stop=stop, **budget())
            out.update({f"lambda_{i + 1}": float(v) for i, v in enumerate(res.values)})
            out["eig_converged"] = float(res.converged)
            out["eig_start"] = res.start
        elif quantity == "trace":
            # the model, so that "auto" can take the exact Gauss-Newton route where it applies
            tr = curvature.hessian_trace(model, loss_fn, data, probes=probes, seed=seed,
                                         **budget())
            out.update(trace=tr.value, trace_stderr=tr.stderr,
                       trace_converged=float(tr.converged), trace_method=tr.method)
            trace_products = tr.n_matvecs
        elif quantity == "density":
            d = curvature.spectral_density(op, steps=steps, seed=seed, **budget())
            live = d.weights > 0
            out.update(density_min=float(d.nodes[live].min()),
                       density_max=float(d.nodes[live].max()),
                       density_m1=d.moment(1), density_m2=d.moment(2),
                       density_converged=float(d.converged))
            if density_plot is not None:
                Path(density_plot).parent.mkdir(parents=True, exist_ok=True)
                curvature.plot_density(d, path=density_plot)
                out["density_plot"] = str(density_plot)
        else:
            grad = curvature.gradient_norm(model, loss_fn, data)
            out.update(loss=grad.loss, grad_norm=grad.value)
            parts = [("worst_case_l2", lambda b: curvature.worst_case_sharpness(
                         model, loss_fn, data, rho, **b)),
                     ("adaptive_worst_case_linf", lambda b: curvature.worst_case_sharpness(
                         model, loss_fn, data, rho, adaptive=True, norm="linf", **b)),
                     ("first_order_flatness", lambda b: curvature.first_order_flatness(
                         model, loss_fn, data, rho, **b))]
            converged = True
            for name, run in parts:
                if out_of_time():
                    converged = False
                    break
                res = run(budget())
                out[name] = res.value
                converged = converged and res.converged
            out["sharpness_converged"] = float(converged)
    out["n_hvps"] = float(op.n_matvecs + trace_products)
    return out


def _checked(name: str, check: Any, value: Any) -> Any:
    """``check(name, value)``, with its TypeError / ValueError as one ConfigError line."""
    try:
        return check(name, value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def measure_checkpoint(
    checkpoint: str | Path,
    *,
    model: str = "",
    data: str = "",
    what: str | Sequence[str] = QUANTITIES,
    tag: str | None = None,
    loss: str = "cross_entropy",
    **kwargs: Any,
) -> dict[str, float]:
    """Load a checkpoint's model and data factories, then :func:`measure` (``kwargs``)."""
    if isinstance(what, str):
        what = [w.strip() for w in what.split(",") if w.strip()]
    loss_fn = getattr(nn.functional, loss, None)
    if loss_fn is None:
        raise ConfigError(f"loss must name a torch.nn.functional loss, got {loss!r}")
    net = load_model(checkpoint, model, tag)
    if "density" in what:
        kwargs.setdefault("density_plot", run_folder(checkpoint, tag) / "plots" / "density.png")
    return measure(net, loss_fn, load_data(data), list(what), **kwargs)


def run_folder(checkpoint: str | Path, tag: str | None = None) -> Path:
    """The run folder of a checkpoint: the folder given, the folder above
    ``checkpoints/<tag>/latest.pt``, or else the checkpoint file's own folder."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    found = find_checkpoint(path, tag)
    if found.parent.parent.name == "checkpoints":
        return found.parents[2]
    return found.parent


def format_results(results: dict[str, float | str]) -> str:
    """Two aligned columns, one quantity a line (paths as they are)."""
    width = max(len(k) for k in results)
    return "\n".join(f"{k.ljust(width)}  {v if isinstance(v, str) else format(v, '.6g')}"
                     for k, v in results.items())
