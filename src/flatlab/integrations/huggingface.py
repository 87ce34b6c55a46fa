"""flatlab's sharpness-aware optimizers inside Hugging Face ``transformers.Trainer``.

``transformers.Trainer`` calls ``optimizer.step()`` without a closure, after the last
micro-batch's backward, so a two-pass method has no way to re-evaluate the loss. The
:class:`SharpnessAwareTrainer` below drives the closure itself:

* for every micro-batch but the last of an accumulation window, ``training_step`` is the
  Trainer's own (forward, loss scaled for accumulation, backward);
* for the last micro-batch it calls ``optimizer.step(closure)``, the closure being that same
  Trainer training step on that micro-batch. The gradients of the earlier micro-batches are
  *carried*: by flatlab's accumulation rule they enter every pass as a fixed term
  (``docs/optim.md``, "Gradient accumulation: the semantics");
* the Trainer's own ``optimizer.step()`` that follows is then a no-op (the Trainer is handed a
  thin adaptor that shares the optimizer's ``param_groups`` and state, so its LR scheduler,
  checkpoints and logging work unchanged).

Gradient clipping: the Trainer clips *after* the step here, so its ``max_grad_norm`` is handed
to the optimizer's ``clip_grad_norm`` (which clips the descent gradient, the right place) and the
Trainer's own clipping is switched off. Per-domain methods (DGSAM, SAGM) need one closure per
domain and are refused.

Example (a tiny model built from a config; runs offline)::

    from flatlab.integrations.huggingface import SharpnessAwareTrainer
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=5e-4)
    trainer = SharpnessAwareTrainer(model=model, args=args, train_dataset=data,
                                    optimizers=(opt, None))
    trainer.train()
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

try:
    from transformers import Trainer
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "flatlab.integrations.huggingface needs transformers and accelerate: "
        "pip install transformers accelerate"
    ) from err

from flatlab.optim.base import SharpnessAware

__all__ = ["SharpnessAwareTrainer"]


class _DrivenOptimizer(Optimizer):
    """What the Trainer sees: the flatlab optimizer's groups and state, and a ``step`` that
    only confirms the step :class:`SharpnessAwareTrainer` already took."""

    def __init__(self, inner: SharpnessAware) -> None:
        self.inner = inner
        self.pending = False
        super().__init__(inner.param_groups, {})
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.defaults = inner.defaults

    def step(self, closure: Any = None) -> None:  # noqa: D102 - see the class docstring
        if closure is not None:
            return self.inner.step(closure)
        if not self.pending:
            raise RuntimeError(
                "the Trainer stepped the optimizer without SharpnessAwareTrainer.training_step; "
                "flatlab's optimizers need a closure (see flatlab.integrations.huggingface)"
            )
        self.pending = False
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state


class SharpnessAwareTrainer(Trainer):
    """``transformers.Trainer`` whose optimizer is a flatlab sharpness-aware optimizer.

    Pass the optimizer as ``optimizers=(flatlab_optimizer, scheduler_or_None)``. Everything
    else is the Trainer's (data, accumulation, LR schedule, logging, checkpoints). The number of
    forward-backward passes per optimizer step is ``k - 1 + opt.closure_calls`` for
    ``gradient_accumulation_steps = k``.

    Raises:
        TypeError: no flatlab optimizer was given, or it is a per-domain method.
    """

    def __init__(self, *args: Any, optimizers: tuple[Any, Any] = (None, None), **kwargs: Any):
        opt, scheduler = optimizers
        if not isinstance(opt, SharpnessAware):
            raise TypeError(
                "SharpnessAwareTrainer needs optimizers=(a flatlab sharpness-aware optimizer, "
                f"scheduler or None), got {type(opt).__name__}"
            )
        if opt.per_domain:
            raise TypeError(
                f"{type(opt).__name__} takes one closure per domain; SharpnessAwareTrainer "
                "drives single-closure methods only"
            )
        self.sharpness_optimizer = opt
        super().__init__(*args, optimizers=(_DrivenOptimizer(opt), scheduler), **kwargs)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            if opt.clip_grad_norm is None:
                opt.clip_grad_norm = float(self.args.max_grad_norm)
            self.args.max_grad_norm = 0.0  # the optimizer clips the descent gradient instead

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """The Trainer's step for a micro-batch; for the last one of an accumulation window,
        the flatlab optimizer's ``step(closure)`` with that same step as the closure."""
        if not self.accelerator.sync_gradients:
            return super().training_step(model, inputs, num_items_in_batch)

        def closure() -> torch.Tensor:
            return Trainer.training_step(self, model, dict(inputs), num_items_in_batch)

        loss = self.sharpness_optimizer.step(closure)
        driven = self.optimizer
        while not isinstance(driven, _DrivenOptimizer):  # accelerate wraps it
            driven = driven.optimizer
        driven.pending = True
        if loss is None:  # the step was skipped for a non-finite value
            return torch.tensor(float("nan"), device=self.args.device)
        return loss.detach().to(self.args.device)
