"""Run folders and the experiment registry / launcher."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from pydantic import BaseModel, Field

import flatlab.experiments as experiments
from flatlab.experiments import (
    ConfigError,
    ExperimentConfig,
    _registry,
    describe_fields,
    launch,
    register,
    resolve_config,
)
from flatlab.train import Run


def test_create_writes_the_layout_and_resolved_config(tmp_path) -> None:
    run = Run.create(tmp_path, "exp", {"lr": 0.1, "model": {"width": 3}})
    again = Run.create(tmp_path, "exp", {})
    assert run.path != again.path and run.path.name.startswith("exp-")
    assert {p.name for p in run.path.iterdir()} == {"config.json", "metrics.jsonl", "plots",
                                                   "checkpoints"}
    saved = json.loads((run.path / "config.json").read_text())
    assert saved["experiment"] == "exp" and saved["config"] == {"lr": 0.1, "model": {"width": 3}}
    assert Run.open(run.path).config == saved["config"]


def test_log_is_append_only_json_and_skips_a_torn_last_line(tmp_path) -> None:
    run = Run.create(tmp_path, "exp", {})
    run.log(tag="a", step=1, loss=torch.tensor(0.5), extra=float("nan"))
    run.log({"tag": "b", "step": 1}, acc=1)
    with open(run.metrics_path, "a") as fh:
        fh.write('{"tag": "a", "st')
    assert run.metrics() == [{"tag": "a", "step": 1, "loss": 0.5, "extra": "nan"},
                             {"tag": "b", "step": 1, "acc": 1}]
    assert run.metrics("b") == [{"tag": "b", "step": 1, "acc": 1}]


def test_sections_replace_by_title_and_done_marker(tmp_path) -> None:
    run = Run.create(tmp_path, "exp", {})
    run.add_section("A", "one")
    run.add_section("B", table=[{"x": 1}])
    run.add_section("A", "two", figures=[run.plots_dir / "f.png"])
    assert [(s["title"], s["text"]) for s in run.sections()] == [("B", ""), ("A", "two")]
    assert run.sections()[1]["figures"] == ["plots/f.png"]
    assert not run.done and run.results() == {}
    run.mark_done({"acc": torch.tensor(0.25)})
    assert run.done and run.results() == {"acc": 0.25}
    Run.open(run.path, resume=True)
    assert not run.done  # resuming reopens the run


def test_register_checks_its_arguments() -> None:
    class NoQuick(BaseModel):
        lr: float = 0.1

    with pytest.raises(TypeError, match="must have a 'quick: bool' field"):
        register("x", NoQuick)
    with pytest.raises(TypeError, match="pydantic BaseModel subclass"):
        register("x", dict)


def test_describe_fields_flattens_nested_models_with_constraints() -> None:
    class Model(BaseModel):
        width: int = Field(8, ge=1, description="hidden width")

    class Config(ExperimentConfig):
        lr: float = Field(0.1, gt=0, description="learning rate")
        model: Model = Model()

    rows = {r[0]: r for r in describe_fields(Config)}
    assert rows["lr"] == ("lr", "float (> 0)", "0.1", "learning rate")
    assert rows["model.width"] == ("model.width", "int (>= 1)", "8", "hidden width")
    assert rows["quick"][1:3] == ("bool", "False")


TOY = textwrap.dedent(
    '''
    import torch
    from pydantic import Field

    from flatlab.experiments import ExperimentConfig, Run, register
    from flatlab.train import Checkpoint, Evaluate, build_optimizer, fit


    class Config(ExperimentConfig):
        lr: float = Field(0.1, gt=0, description="learning rate")
        steps: int = Field(12, ge=1, description="optimizer steps")


    @register("toy_for_tests", Config, help="logistic regression on random data",
              quick={"steps": 4})
    def run(cfg: Config, run: Run) -> dict:
        steps = cfg.steps
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(64, 5, generator=g)
        y = (x[:, 0] > 0).long()
        model = torch.nn.Linear(5, 2)
        opt = build_optimizer("sgd", model.parameters(), lr=cfg.lr, momentum=0.9)
        res = fit(model, opt, (x, y), steps=steps, run=run, tag="sgd", batch_size=16,
                  callbacks=[Evaluate({"train": (x, y)}, every=2), Checkpoint(every=4)],
                  progress=False)
        run.add_section("Numbers", "Final values.", table=[{"loss": res.last("loss")}])
        return {"final_loss": res.last("loss"), "train_acc": res.last("train_acc")}
    '''
)

BROKEN = "raise ImportError('needs a package this machine lacks')\n"


@pytest.fixture
def toy_package(tmp_path, monkeypatch):
    """Discover a toy experiment and a broken module from an extra folder of the package."""
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "toy_for_tests.py").write_text(TOY)
    (folder / "broken_for_tests.py").write_text(BROKEN)
    _registry.discover()  # the real registry is complete before it is copied and restored
    monkeypatch.setattr(experiments, "__path__", [*experiments.__path__, str(folder)])
    monkeypatch.setattr(_registry, "_DISCOVERED", False)
    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))
    monkeypatch.setattr(_registry, "_BROKEN", dict(_registry._BROKEN))
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)  # launch() sets it from the config
    import sys

    for mod in ("flatlab.experiments.toy_for_tests", "flatlab.experiments.broken_for_tests"):
        sys.modules.pop(mod, None)


def test_discovery_registers_modules_and_remembers_broken_ones(toy_package) -> None:
    assert "toy_for_tests" in experiments.names()
    assert "broken_for_tests" in experiments.broken()
    with pytest.raises(ConfigError, match="'broken_for_tests' failed to import: ImportError"):
        resolve_config("broken_for_tests")


def test_launch_runs_writes_report_and_resumes(toy_package, tmp_path) -> None:
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    run = launch("toy_for_tests", overrides=["lr=0.2"], out=tmp_path)
    assert run.done and run.config["lr"] == 0.2
    assert torch.are_deterministic_algorithms_enabled() == deterministic  # restored after the run
    assert torch.get_num_threads() == threads
    assert set(run.results()) == {"final_loss", "train_acc"}
    assert (run.path / "report.html").is_file() and (run.path / "report.md").is_file()
    before = run.metrics()
    again = launch(resume=run.path)  # finished phases are not trained again
    assert again.path == run.path and again.metrics() == before and again.done
    with pytest.raises(ConfigError, match="drop --config/--set/--quick"):
        launch(resume=run.path, quick=True)
    with pytest.raises(ConfigError, match="not a run folder"):
        launch(resume=tmp_path / "nothing")


def test_tensorboard_writer_receives_every_numeric_metric(toy_package, tmp_path,
                                                          monkeypatch) -> None:
    """--tensorboard with a stand-in SummaryWriter (tensorboard itself is optional)."""
    import sys
    import types

    calls: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, key: str, value: float, step: int) -> None:
            calls.append((key, value, step))

        def close(self) -> None:
            calls.append(("closed", 0.0, 0))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    run = launch("toy_for_tests", quick=True, tensorboard=True, out=tmp_path, report=False)
    keys = {k for k, _, _ in calls}
    assert {"sgd/loss", "sgd/train_acc", "sgd/passes", "closed"} <= keys
    assert len([c for c in calls if c[0] == "sgd/loss"]) == len(run.metrics("sgd")) - 1


def test_hooks_are_registration_arguments_used_by_sweep_and_compare(tmp_path,
                                                                    monkeypatch) -> None:
    """``summary_rows`` and ``sweep_defaults`` come from ``register``, not module attributes."""
    from flatlab.report import experiment_summaries
    from flatlab.sweep.command import plan

    class Config(ExperimentConfig):
        lr: float = 0.1
        width: int = 1

    def summary(records):
        return [{"n": len(records)}]

    def defaults(cfg):
        return {"grid": {"width": [1, int(10 * cfg.lr)]}}

    def run_fn(cfg, run):
        return {}

    monkeypatch.setitem(_registry._REGISTRY, "hooked", None)  # removed again after the test
    register("hooked", Config, summary_rows=summary, sweep_defaults=defaults)(run_fn)
    info = experiments.get("hooked")
    assert info.summary_rows is summary and info.sweep_defaults is defaults
    jobs = plan("hooked", tmp_path / "sweep", sets=["lr=0.5"])
    assert {(j.overrides["lr"], j.overrides["width"]) for j in jobs} == {("0.5", 1), ("0.5", 5)}
    run = Run.create(tmp_path, "hooked", {})
    run.log(tag="a", step=1)
    assert experiment_summaries([run.path]) == [{"run": run.path.name, "n": 1}]


def test_quick_preset_is_one_layer_below_set(tmp_path, monkeypatch) -> None:
    """``register(quick=...)`` is the one place ``--quick`` shrinks a run: applied however
    ``quick`` was turned on, derived from the other layers, below an explicit ``--set``."""

    class Config(ExperimentConfig):
        steps: int = Field(1000, ge=1)
        eval_every: int = Field(100, ge=1)
        width: int = 64

    def shrink(cfg):
        steps = min(cfg.steps, 40)
        return {"steps": steps, "eval_every": max(steps // 4, 1)}

    monkeypatch.setitem(_registry._REGISTRY, "shrinks", None)  # removed again after the test
    register("shrinks", Config, quick=shrink)(lambda cfg, run: {})
    monkeypatch.setitem(_registry._REGISTRY, "shrinks_dict", None)
    register("shrinks_dict", Config, quick={"steps": 5, "width": 8})(lambda cfg, run: {})

    def got(name="shrinks", **kw):
        c = resolve_config(name, **kw)
        return c.quick, c.steps, c.eval_every, c.width

    assert got() == (False, 1000, 100, 64)  # no preset without quick
    assert got(quick=True) == (True, 40, 10, 64)
    assert got(overrides=["quick=true"]) == (True, 40, 10, 64)  # a sweep's --set quick=true
    file = tmp_path / "c.yaml"
    file.write_text("quick: true\nsteps: 20\nwidth: 32\n")
    assert got(config_file=file) == (True, 20, 5, 32)  # the preset shrinks what the file says
    # derived from --set values, and an explicit --set always wins over the preset
    assert got(quick=True, overrides=["steps=8"]) == (True, 8, 2, 64)
    assert got(quick=True, overrides=["eval_every=3"]) == (True, 40, 3, 64)
    assert got("shrinks_dict", quick=True) == (True, 5, 100, 8)
    assert got("shrinks_dict", config_file=file, overrides=["width=2"]) == (True, 5, 100, 2)
    with pytest.raises(ValueError, match=r"keys must be fields of Config, got \['nope'\]"):
        register("bad_preset", Config, quick={"nope": 1})
    with pytest.raises(TypeError, match="quick must be a mapping or a function"):
        register("bad_preset", Config, quick=3)


def test_every_experiment_shrinks_through_its_preset_alone() -> None:
    """Each shipped experiment registers a ``--quick`` preset that changes its config, and no
    experiment module reads ``cfg.quick`` itself (the preset is the one implementation)."""
    import ast
    from pathlib import Path

    for name in experiments.names():
        exp = experiments.get(name)
        if not exp.module.startswith("flatlab.experiments."):
            continue
        assert exp.quick is not None, name
        full, quick = resolve_config(name), resolve_config(name, quick=True)
        changed = {k for k in type(full).model_fields if getattr(full, k) != getattr(quick, k)}
        assert changed - {"quick"}, f"{name}: --quick changes nothing but the flag"
    package = Path(experiments.__file__).parent
    readers = [f"{path.name}:{node.lineno}" for path in sorted(package.glob("*.py"))
               if path.name != "_registry.py"
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Attribute) and node.attr == "quick"]
    assert readers == []
