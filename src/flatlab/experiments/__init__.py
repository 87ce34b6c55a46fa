'''flatlab.experiments: one module per reproduced result, found automatically, run by name.

Writing an experiment (the whole author API)
============================================

Add ONE file ``src/flatlab/experiments/<name>.py`` (no central list: modules are discovered
with :mod:`pkgutil`; names starting with ``_`` are private helpers and skipped). It holds:

1. ``class Config(ExperimentConfig)``: a pydantic model. Every field has a default and a
   ``description`` (``Field(0.1, gt=0, description="learning rate")``); constraints such as
   ``gt=0`` are checked when the config is built, so a bad ``--set lr=-1`` exits with code 2
   and one line. The base class provides ``quick: bool`` (``--quick`` sets it), ``seed:
   int``, ``deterministic: bool`` and ``threads: int`` (torch CPU threads, default 1, 0 =
   torch's default; applied by the launcher, in this one place, before ``run`` is called and
   restored after) and forbids unknown keys. Nested settings are nested
   ``BaseModel`` fields (``--set model.width=64``). Data directories use the type
   :data:`ExistingDir` (must exist; ``Optional[ExistingDir] = None`` for "not given").
2. ``@register("<name>", Config, help="one line for flatlab list", quick=...)`` on
   ``def run(cfg: Config, run: Run) -> dict``. It trains through :func:`flatlab.train.fit`,
   writes into the run folder and returns the headline results (a flat dict of numbers /
   strings; stored in the ``done`` marker and shown at the top of the report). ``quick`` is
   the preset that shrinks the run to well under a minute: a dict of config values, or a
   function of the resolved config returning them (``lambda c: {"steps": min(c.steps, 20)}``).
   Config resolution applies it, below ``--set``; ``run`` never reads ``cfg.quick``, so the
   saved config and the report state the sizes that ran.

The :class:`~flatlab.train.Run` object (``run``) gives:

* ``run.path`` - the folder ``runs/<name>-<timestamp>/`` (``config.json`` already written).
* ``run.log(step=..., tag=..., **metrics)`` - append a record to ``metrics.jsonl``
  (``fit`` logs its own records, tagged with its ``tag``).
* ``run.metrics(tag=None)`` - the records read back (list of dicts).
* ``run.savefig(fig, "name")`` - save a matplotlib figure as ``plots/name.png``, returns the
  path. Make figures with ``flatlab.report.plots`` (``curves``, ``eigenvalue_plot``, ``bars``,
  ``domain_bars``) or plain matplotlib (the Agg backend is selected by flatlab.report).
* ``run.add_section(title, text, table=[{...}, ...], figures=[path, ...])`` - a report section;
  the same title again replaces it (resume-safe). ``report.html`` and ``report.md`` are written
  by the launcher after ``run`` returns: a header, your results, your sections in order,
  loss/accuracy curves of every ``fit`` tag (only if no section has figures), the config.
* ``run.checkpoints_dir``, ``run.plots_dir``.

Resuming: ``flatlab run --resume RUN_DIR`` calls your ``run`` again with the saved config.
Every ``fit(..., run=run, tag=...)`` whose tag has a finished checkpoint restores the model and
returns at once; the interrupted one continues from its latest checkpoint. So: give each
training phase its own ``tag``, build models/data deterministically from ``cfg.seed`` before
calling ``fit``, and do not log from outside ``fit`` before the last ``fit`` returns (such
records are truncated and re-logged on resume).

Training (:mod:`flatlab.train`)::

    fit(model, optimizer, train, *, steps, loss_fn=F.cross_entropy, batch_size=None,
        callbacks=(), run=None, tag="train", scheduler=None, seed=0, log_every=1)
      -> FitResult(tag, steps, history, diverged, passes_per_step, time_per_step)

``train`` is an ``(x, y)`` pair / ``TensorDataset`` (``Splits.train``), or a list of them or a
``flatlab.data.Domains`` (one minibatch per domain per step; optimizers with
``per_domain = True`` get ``step([closure_per_domain])``). Records hold ``step, loss, lr,
passes, step_time, step_cpu_time`` plus callback metrics. Callbacks:
``Evaluate({"val": pair}, every)`` (``val_loss``, ``val_acc``),
``CurvatureMonitor(every, k, method, rho)`` (``lambda_max``, ``edge_gd`` = 2/lr,
``edge_usam``/``edge_sam``), ``Sharpness(every, measure, rho)`` (``sharpness_<measure>``),
``ActivationSparsity(every)`` (``act_sparsity``), ``Checkpoint(every)``.
``build_optimizer(name, params, lr=..., **kw)`` maps "sgd", "adamw",
"signsgd", "rmspropw", "sam", "asam", "usam", "gam", "samgam", "dgsam", "sagm".

Minimal example (``src/flatlab/experiments/toy.py``)::

    import torch
    from pydantic import Field

    from flatlab.experiments import ExperimentConfig, Run, register
    from flatlab.report import plots
    from flatlab.train import Evaluate, build_optimizer, fit


    class Config(ExperimentConfig):
        lr: float = Field(0.1, gt=0, description="learning rate")
        steps: int = Field(200, ge=1, description="optimizer steps")


    @register("toy", Config, help="logistic regression on random data",
              quick={"steps": 20})  # --quick: 20 steps, unless --set steps=... says otherwise
    def run(cfg: Config, run: Run) -> dict:
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(256, 5, generator=g)
        y = (x[:, 0] > 0).long()
        model = torch.nn.Linear(5, 2)
        opt = build_optimizer("sgd", model.parameters(), lr=cfg.lr)
        res = fit(model, opt, (x, y), steps=cfg.steps, run=run, tag="sgd",
                  callbacks=[Evaluate({"train": (x, y)}, every=10)])
        fig = plots.curves({"sgd": res.history}, "loss")
        run.add_section("Loss", "Training loss per step.", figures=[run.savefig(fig, "loss")])
        return {"final_loss": res.last("loss"), "train_acc": res.last("train_acc")}

Then ``flatlab run toy --quick --set lr=0.05`` and ``flatlab run toy --help`` (lists the
fields). Tests run experiments in-process with
``flatlab.experiments.launch("toy", quick=True, out=tmp_path)``.
'''

from flatlab.experiments._launch import launch
from flatlab.experiments._registry import (
    ExistingDir,
    Experiment,
    ExperimentConfig,
    broken,
    describe_fields,
    discover,
    get,
    load_factory,
    names,
    parse_overrides,
    register,
    resolve_config,
)
from flatlab.rundir import ConfigError, Run

__all__ = [
    "ConfigError", "ExistingDir", "Experiment", "ExperimentConfig", "Run", "broken",
    "describe_fields", "discover", "get", "launch", "load_factory", "names", "parse_overrides",
    "register", "resolve_config",
]
