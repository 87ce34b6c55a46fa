"""flatlab.train: one training loop for every optimizer, run folders, checkpoints, callbacks.

* :func:`fit` - the loop (closure contract; full batch, minibatch, or one minibatch per domain
  with ``step(closures)`` for ``per_domain`` optimizers), counting forward-backward passes and
  timing each step, with callbacks and atomic, bit-for-bit resumable checkpoints.
* :func:`build_optimizer` - ``"sgd"``, ``"adamw"``, ``"signsgd"``, ``"rmspropw"``, ``"sam"``,
  ``"asam"``, ``"usam"``, ``"gam"``, ``"samgam"``, ``"dgsam"``, ``"sagm"`` by name.
* :class:`Run` - the run folder (``config.json``, ``metrics.jsonl``, ``plots/``,
  ``checkpoints/``, report sections, ``done``).
* Callbacks: :class:`Evaluate`, :class:`CurvatureMonitor`, :class:`Sharpness`,
  :class:`ActivationSparsity`, :class:`Checkpoint`.
* :func:`seed_everything`, :func:`save_checkpoint`, :func:`load_checkpoint`.

Example:
    >>> import torch
    >>> from flatlab.train import build_optimizer, fit
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> x, y = torch.randn(64, 3), torch.randint(0, 2, (64,))
    >>> model = torch.nn.Linear(3, 2)
    >>> result = fit(model, build_optimizer("sgd", model.parameters(), lr=0.1), (x, y),
    ...              steps=5, progress=False)
    >>> result.steps, result.passes_per_step
    (5, 1.0)
"""

from flatlab.rundir import ConfigError, Run
from flatlab.train.callbacks import (
    ActivationSparsity,
    Callback,
    Checkpoint,
    CurvatureMonitor,
    Evaluate,
    FitState,
    Sharpness,
    evaluate,
)
from flatlab.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from flatlab.train.loop import FitResult, fit
from flatlab.train.optimizers import OPTIMIZERS, build_optimizer

__all__ = [
    "OPTIMIZERS", "ActivationSparsity", "Callback", "Checkpoint", "ConfigError",
    "CurvatureMonitor", "Evaluate", "FitResult", "FitState", "Run", "Sharpness",
    "build_optimizer", "evaluate", "fit", "load_checkpoint", "rng_state", "save_checkpoint",
    "seed_everything", "set_rng_state",
]
