r"""One training loop for every optimizer, through the closure contract.

Each step draws a minibatch ``B_t`` (or the full set), builds a closure that zeroes the
gradients, computes ``L_B(θ) = mean_{(x,y) ∈ B_t} loss_fn(model(x), y)``, back-propagates and
returns the loss, and calls ``loss = optimizer.step(closure)``. SGD and AdamW call the closure
once, SAM twice, GAM and the DG optimizers more: the loop counts the calls (forward-backward
passes per step) instead of assuming them.

**Per-domain mode.** When ``train`` is a list of S domain datasets, each step draws one minibatch
per domain. An optimizer with the class attribute ``per_domain = True`` (DGSAM, SAGM) gets
``step([closure_1, ..., closure_S])``, one closure per domain; every other optimizer gets one
closure on the pooled batch ``B_1 ∪ ... ∪ B_S`` (ERM).

**Resume.** With a run folder (or ``checkpoint_dir``), ``fit`` saves ``latest.pt`` atomically
every ``Checkpoint(every=k)`` steps and at the end, holding the model, the optimizer's
``state_dict`` (wrapper and base state), the scheduler, every global RNG, the data-order
generator and permutation, the step, and the callbacks' states. Calling ``fit`` again with the
same arguments finds it and continues; the resumed run logs exactly the metrics the
uninterrupted one would have (bit-for-bit on the same machine with deterministic algorithms).

**Data-parallel.** At R ranks (``distributed=True``, or a laboratory run launched with
``--nproc R``) every rank draws the same minibatch and trains on its part of it, with
gradients weighted so that their average over the ranks is the global minibatch's gradient;
rank 0 writes the checkpoints and every rank resumes from them (:mod:`flatlab.train.parallel`).

Shapes: inputs ``x`` are ``(N, ...)`` and targets ``y`` are ``(N,)`` class indices or
``(N, ...)`` regression targets; ``loss_fn(model(x), y)`` must return a mean-reduced scalar.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatlab._checks import check_positive_int
from flatlab.rundir import Run
from flatlab.train.callbacks import Callback, Checkpoint, FitState
from flatlab.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from flatlab.train.data import Sampler, as_domains
from flatlab.train.parallel import DataParallel, current, reduces_itself

__all__ = ["FitResult", "fit"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        tag: the training phase's name (its records in ``metrics.jsonl`` carry it).
        steps: steps completed.
        history: every record logged by this fit, in order (dicts with ``step``, ``loss``...).
        diverged: True if the loss became non-finite (training stopped there).
        passes_per_step: mean forward-backward passes (closure calls) per step.
        time_per_step: mean wall-clock seconds per optimizer step.
        cpu_time_per_step: mean CPU seconds of this process per optimizer step (all threads;
            robust to other jobs sharing the machine, unlike wall-clock time).
        resumed_from: the step a checkpoint was restored at, or None for a fresh start.
    """

    tag: str
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    diverged: bool = False
    passes_per_step: float = 0.0
    time_per_step: float = 0.0
    cpu_time_per_step: float = 0.0
    resumed_from: int | None = None

    def last(self, key: str, default: Any = None) -> Any:
        """The last logged value of ``key`` (e.g. ``"val_acc"``), or ``default``."""
        for rec in reversed(self.history):
            if key in rec:
                return rec[key]
        return default


def _loss_value(loss: Any) -> float:
    if isinstance(loss, (list, tuple)):
        return sum(_loss_value(v) for v in loss) / max(len(loss), 1)
    if isinstance(loss, torch.Tensor):
        return float(loss.detach().double().mean())
    return float(loss) if loss is not None else math.nan


def _lr(optimizer: Any) -> float:
    return float(optimizer.param_groups[0]["lr"])


def _parallel(distributed: bool | None, run: Run | None) -> DataParallel | None:
    if distributed is None:
        return getattr(run, "parallel", None)
    if not distributed:
        return None
    par = current()
    if par is None:
        raise ValueError("distributed=True needs an initialized process group of more than one "
                         "rank (torch.distributed.init_process_group, or launch with torchrun)")
    return par


def fit(
    model: nn.Module,
    optimizer: Any,
    train: Any,
    *,
    steps: int,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int | None = None,
    callbacks: Sequence[Callback] = (),
    run: Run | None = None,
    tag: str = "train",
    scheduler: Any = None,
    seed: int = 0,
    log_every: int = 1,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    stop_on_nonfinite: bool = True,
    distributed: bool | None = None,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> FitResult:
    """Train ``model`` with ``optimizer`` for ``steps`` steps on ``train``.

    Args:
        model: the network, in train mode during steps.
        optimizer: anything with ``step(closure)`` and ``param_groups`` (torch optimizers,
            flatlab wrappers), or ``step(closures)`` with ``per_domain = True``.
        train: ``(x, y)`` tensors or a ``TensorDataset`` (one dataset), or a list of them
            (domains, one minibatch per domain per step).
        steps: total optimizer steps (a resumed fit runs the remaining ones).
        loss_fn: ``loss_fn(outputs, targets)`` returning a mean-reduced scalar.
        batch_size: minibatch size per dataset; None for full batch.
        callbacks: :class:`Callback` objects (evaluation, curvature, sharpness, sparsity,
            :class:`Checkpoint`); their metrics are merged into the step's record.
        run: the run folder to log ``metrics.jsonl`` and checkpoints into.
        tag: name of this training phase (``checkpoints/<tag>/``, the ``tag`` of records).
        scheduler: an LR scheduler stepped once per optimizer step.
        seed: seed of the data-order generator (minibatch sampling).
        log_every: log the training loss every this many steps (callback steps always log).
        checkpoint_dir: where ``latest.pt`` goes when there is no ``run``.
        progress: show a tqdm progress bar on stderr.
        stop_on_nonfinite: stop when the loss is NaN/inf (``FitResult.diverged``).
        distributed: train data-parallel over the ranks of the default process group (see
            :mod:`flatlab.train.parallel`): every rank passes the whole ``train`` and takes
            its part of each minibatch; only rank 0 writes checkpoints and shows progress.
            ``None`` (default): as ``run`` says (a laboratory run at several ranks).
        augment: ``augment(x, generator) -> x`` applied to every training minibatch's inputs
            (after sampling, before the optimizer step; e.g.
            :class:`flatlab.data.augment.DomainBedAugment`). It must draw its randomness from
            ``generator``, the data-order generator saved in checkpoints, so a resumed fit
            augments exactly as an uninterrupted one. Evaluation callbacks see raw data.

    Raises:
        ValueError / TypeError: bad ``steps``, ``batch_size``, ``log_every`` or data.
    """
    check_positive_int("steps", steps)
    check_positive_int("log_every", log_every)
    par = _parallel(distributed, run)
    writes = par is None or par.writes
    self_reducing = par is not None and reduces_itself(optimizer)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    domains = as_domains(train)
    generator = torch.Generator().manual_seed(seed)
    samplers = [Sampler(x.shape[0], batch_size, generator) for x, _ in domains]
    per_domain = bool(getattr(optimizer, "per_domain", False))
    checkpoints = [cb for cb in callbacks if isinstance(cb, Checkpoint)]
    measures = [cb for cb in callbacks if not isinstance(cb, Checkpoint)]
    history: list[dict[str, Any]] = []

    ckpt_path = None
    if run is not None:
        ckpt_path = run.checkpoints_dir / tag / "latest.pt"
    elif checkpoint_dir is not None:
        ckpt_path = Path(checkpoint_dir) / "latest.pt"

    state = FitState(model=model, optimizer=optimizer, loss_fn=loss_fn, train=domains,
                     steps=steps, run=run, tag=tag, parallel=par)
    start, resumed_from, totals = 0, None, {"passes": 0, "time": 0.0, "steps": 0}
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        generator.set_state(ckpt["generator"])
        for sampler, s in zip(samplers, ckpt["samplers"]):
            sampler.load_state_dict(s)
        for i, cb in enumerate(measures):
            cb.load_state_dict(ckpt["callbacks"].get(str(i), {}))
        set_rng_state(ckpt["rng"])
        start = resumed_from = int(ckpt["meta"]["step"])
        totals = dict(ckpt["meta"]["totals"])
        state.diverged = bool(ckpt["meta"].get("diverged", False))

    def emit(record: dict[str, Any]) -> None:
        rec = run.log(record) if run is not None else dict(record)
        if run is None:
            history.append(rec)

    def save(finished: bool) -> None:
        if ckpt_path is None or not writes:
            return
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "generator": generator.get_state(),
            "samplers": [s.state_dict() for s in samplers],
            "callbacks": {str(i): cb.state_dict() for i, cb in enumerate(measures)},
            "rng": rng_state(),
            "meta": {"step": state.step, "finished": finished, "totals": totals,
                     "diverged": state.diverged, "saved_ns": time.time_ns(),
                     "metrics_offset": run.metrics_offset() if run is not None else 0},
        })

    def measure(record: dict[str, Any], final: bool) -> bool:
        was_training = model.training
        hit = False
        for cb in measures:
            if final or state.step % cb.every == 0:
                out = cb.on_step(state)
                if out:
                    record.update(out)
                    hit = True
        model.train(was_training)
        return hit

    state.step = start
    if start == 0:  # the starting point, measured once
        record = {"tag": tag, "step": 0, "lr": _lr(optimizer)}
        if measure(record, final=False):
            emit(record)

    bar = None
    if progress and writes and start < steps and not state.diverged:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=tag, file=sys.stderr, leave=False,
                   mininterval=0.5, dynamic_ncols=True)
    model.train()
    for step in range(start, steps):
        if state.diverged:
            break
        picks = [sampler.next() for sampler in samplers]
        batches = [(x[idx], y[idx]) for (x, y), idx in zip(domains, picks)]
        if augment is not None:
            batches = [(augment(x, generator), y) for x, y in batches]
        passes = 0

        def make_closure(x: torch.Tensor, y: torch.Tensor) -> Callable[..., torch.Tensor]:
            weight = 1.0
            if par is not None:  # this rank's part of the global minibatch (module docstring)
                x, y, weight = par.part(x, y)

            def closure(backward: Callable[..., Any] = torch.autograd.backward) -> torch.Tensor:
                # ``backward`` is the optimizer's graph-keeping one for exact GAM's HVP passes
                nonlocal passes
                passes += 1
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                backward(loss if par is None else loss * weight)
                if par is not None and not self_reducing:
                    par.average_([p.grad for g in optimizer.param_groups for p in g["params"]
                                  if p.grad is not None])
                return loss.detach()
            closure.batch_size = int(x.shape[0])  # type: ignore[attr-defined]  # SAGM's check
            closure.weight = weight  # type: ignore[attr-defined]
            return closure

        lr = _lr(optimizer)
        t0, c0 = time.perf_counter(), time.process_time()
        if per_domain:
            closures = [make_closure(x, y) for x, y in batches]
            loss = optimizer.step(closures)
        else:
            if len(batches) == 1:
                x, y = batches[0]
            else:
                x = torch.cat([b[0] for b in batches])
                y = torch.cat([b[1] for b in batches])
            closures = [make_closure(x, y)]
            loss = optimizer.step(closures[0])
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        if scheduler is not None:
            scheduler.step()
        state.step = step + 1
        state.loss = _loss_value(loss)
        if par is not None:  # the global minibatch's loss, and one model on every rank
            weight = sum(c.weight for c in closures) / len(closures)
            state.loss = par.mean_loss(state.loss, weight)
            par.sync_buffers_(model)
        totals["passes"] += passes
        totals["time"] += elapsed
        totals["cpu"] = totals.get("cpu", 0.0) + cpu  # older checkpoints lack "cpu"
        totals["steps"] += 1
        final = state.step == steps
        if not math.isfinite(state.loss) and stop_on_nonfinite:
            state.diverged = True
            final = True
        record = {"tag": tag, "step": state.step, "loss": state.loss, "lr": lr,
                  "passes": passes, "step_time": elapsed, "step_cpu_time": cpu}
        hit = False if state.diverged else measure(record, final)
        if hit or final or state.step % log_every == 0:
            if state.diverged:
                record["diverged"] = True
            emit(record)
        if bar is not None:
            bar.update(1)
            if state.step % 10 == 0 or final:
                bar.set_postfix(loss=f"{state.loss:.4g}", refresh=False)
        if final:
            break
        if any(state.step % cb.every == 0 for cb in checkpoints):
            save(finished=False)
    if bar is not None:
        bar.close()
    if resumed_from is None or resumed_from < state.step:
        save(finished=True)

    if run is not None:
        history = run.metrics(tag)
    n = max(totals["steps"], 1)
    return FitResult(tag=tag, steps=state.step, history=history, diverged=state.diverged,
                     passes_per_step=totals["passes"] / n, time_per_step=totals["time"] / n,
                     cpu_time_per_step=totals.get("cpu", 0.0) / n,
                     resumed_from=resumed_from)
