"""Checkpoints: atomic under SIGKILL, and a killed-then-resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flatlab.train import (
    Callback,
    Checkpoint,
    Evaluate,
    Run,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from flatlab.train import fit as fit_

TRAIN_SCRIPT = textwrap.dedent(
    """
    import importlib.util, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from flatlab.train import (Callback, Checkpoint, CurvatureMonitor, Evaluate, Run,
                               build_optimizer, fit, seed_everything)

    mode, where, kill_tag, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    seed_everything(0)
    run = Run.create(where, "resume", {}) if mode == "fresh" else Run.open(where, resume=True)
    print(run.path, flush=True)

    class Killer(Callback):
        def on_step(self, state):
            if state.tag == kill_tag and state.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 5, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    try:
        import flatlab.optim
        has_sam = hasattr(flatlab.optim, "SAM")
    except ImportError:
        has_sam = False
    try:
        from flatlab.curvature import top_eigenvalues  # noqa: F401
        curv = [CurvatureMonitor((x, y), every=5, tol=1e-3)]
    except ImportError:
        curv = []
    for tag, steps, name in (("a", 20, "sam" if has_sam else "sgd"), ("b", 8, "sgd")):
        model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.2),
                                    torch.nn.Tanh(), torch.nn.Linear(16, 2))
        kw = {"rho": 0.05} if name == "sam" else {}
        opt = build_optimizer(name, model.parameters(), lr=0.1, momentum=0.9, **kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
        fit(model, opt, (x, y), steps=steps, batch_size=8, run=run, tag=tag, scheduler=sched,
            callbacks=[Killer(), Evaluate({"val": (x, y)}, every=3), *curv,
                       Checkpoint(every=5)], progress=False)
    """
)


def _records(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("step_time", None)  # wall clock and CPU time: the fields that may differ
        rec.pop("step_cpu_time", None)
        out.append(rec)
    return out


def _train(script: Path, mode: str, where: Path, kill: tuple[str, int] = ("-", -1)
           ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), mode, str(where), kill[0], str(kill[1])],
                          capture_output=True, text=True, timeout=120)


def _train_in_process(script: Path, where: Path, monkeypatch, capsys) -> None:
    """The uninterrupted reference, run in this process (saves one interpreter start)."""
    monkeypatch.setattr(sys, "argv", [str(script), "fresh", str(where), "-", "-1"])
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    capsys.readouterr()


@pytest.mark.parametrize(
    ("kill", "ckpt_step"),
    [(("a", 12), 10),  # after the second checkpoint of phase a (steps 5 and 10)
     # phase a finished, phase b killed before its first checkpoint (slow: 2 more processes)
     pytest.param(("b", 3), None, marks=pytest.mark.slow)],
    ids=["in-phase-a-after-2nd-checkpoint", "in-phase-b-before-any-checkpoint"],
)
def test_sigkill_then_resume_equals_uninterrupted(
    tmp_path, monkeypatch, capsys, kill, ckpt_step
) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    _train_in_process(script, tmp_path / "whole", monkeypatch, capsys)
    killed = _train(script, "fresh", tmp_path / "killed", kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    killed_dir = Path(killed.stdout.split()[0])
    ckpt_b = killed_dir / "checkpoints" / "b" / "latest.pt"
    if ckpt_step is not None:
        assert load_checkpoint(killed_dir / "checkpoints" / "a" / "latest.pt")["meta"]["step"] \
            == ckpt_step
        assert not ckpt_b.exists()
    else:
        assert load_checkpoint(killed_dir / "checkpoints" / "a" / "latest.pt")["meta"]["finished"]
        assert not ckpt_b.exists()
        assert any(r["tag"] == "b" for r in _records(killed_dir))  # lost records exist
    resumed = _train(script, "resume", killed_dir)
    assert resumed.returncode == 0, resumed.stderr
    (whole_dir,) = (tmp_path / "whole").iterdir()
    expected = _records(whole_dir)
    got = _records(killed_dir)
    assert [(r["tag"], r["step"]) for r in got] == [(r["tag"], r["step"]) for r in expected]
    assert got == expected  # bit-for-bit: floats are written with repr


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from flatlab.train import save_checkpoint
    path = sys.argv[1]
    i = 0
    while True:
        blob = torch.randn(400_000, generator=torch.Generator().manual_seed(i))
        save_checkpoint(path, {"i": i, "blob": blob})
        i += 1
    """
)


def test_kill_during_checkpoint_write_never_corrupts_latest(tmp_path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    path = tmp_path / "latest.pt"
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, str(script), str(path)])
        try:
            deadline = time.monotonic() + 60
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(delay)  # somewhere inside the next writes
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        ckpt = load_checkpoint(path)
        expected = torch.randn(400_000, generator=torch.Generator().manual_seed(ckpt["i"]))
        assert torch.equal(ckpt["blob"], expected)  # the complete payload of write number i
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".latest.pt.tmp")]
    assert path.exists() and all(name.startswith(".latest.pt.tmp-") for name in leftovers)


class Crash(Callback):
    """Raise at a given step (an in-process stand-in for a crash)."""

    def __init__(self, at: int) -> None:
        super().__init__(1)
        self.at = at

    def on_step(self, state) -> None:
        if state.step == self.at:
            raise RuntimeError("crash")


def _setup():
    torch.manual_seed(0)
    x = torch.randn(30, 4)
    y = torch.randint(0, 3, (30,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, opt, (x, y)


def test_in_process_resume_with_checkpoint_dir_is_bit_exact(tmp_path) -> None:
    model, opt, data = _setup()
    ref = fit_(model, opt, data, steps=12, batch_size=7, progress=False,
               callbacks=[Evaluate({"val": data}, every=4)])
    model, opt, data = _setup()
    with pytest.raises(RuntimeError, match="crash"):
        fit_(model, opt, data, steps=12, batch_size=7, progress=False,
             checkpoint_dir=tmp_path, callbacks=[Crash(9), Evaluate({"val": data}, every=4),
                                                 Checkpoint(every=4)])
    torch.manual_seed(123)  # a resumed process starts from other random states
    model, opt, data = _setup()
    res = fit_(model, opt, data, steps=12, batch_size=7, progress=False, checkpoint_dir=tmp_path,
               callbacks=[Crash(-1), Evaluate({"val": data}, every=4), Checkpoint(every=4)])
    assert res.resumed_from == 8
    timing = ("step_time", "step_cpu_time")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in ref.history]
    assert [{k: v for k, v in r.items() if k not in timing} for r in res.history] == [
        r for r in strip if r["step"] > 8]
    # a finished checkpoint: fit returns at once with the trained weights
    again, _, _ = _setup()
    res2 = fit_(again, torch.optim.AdamW(again.parameters(), lr=0.01), data, steps=12,
                batch_size=7, progress=False, checkpoint_dir=tmp_path)
    assert res2.resumed_from == 12 and res2.history == []
    for a, b in zip(again.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_holds_every_piece_of_state(tmp_path) -> None:
    run = Run.create(tmp_path, "x", {})
    model, opt, data = _setup()
    fit_(model, opt, data, steps=3, run=run, tag="t", progress=False)
    ckpt = load_checkpoint(run.checkpoints_dir / "t" / "latest.pt")
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "generator", "samplers", "callbacks",
                         "rng", "meta"}
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python"}
    assert ckpt["meta"]["step"] == 3 and ckpt["meta"]["finished"]
    assert ckpt["optimizer"]["state"]  # AdamW moments were saved
    set_rng_state(ckpt["rng"])  # round trip


def test_save_checkpoint_replaces_atomically_and_cleans_up(tmp_path) -> None:
    path = tmp_path / "sub" / "c.pt"
    save_checkpoint(path, {"a": 1})
    save_checkpoint(path, {"a": 2})
    assert load_checkpoint(path) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["c.pt"]
    with pytest.raises(FileNotFoundError, match="checkpoint does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_resume_truncates_metrics_written_after_the_newest_checkpoint(tmp_path) -> None:
    run = Run.create(tmp_path, "x", {})
    model, opt, data = _setup()
    fit_(model, opt, data, steps=2, run=run, tag="t", progress=False)
    n_lines = len(run.metrics())
    run.log(tag="t", step=99, loss=1.0)  # logged after the checkpoint, lost in a crash
    with open(run.metrics_path, "a") as fh:
        fh.write('{"torn": ')  # a half-written line
    reopened = Run.open(run.path, resume=True)
    assert len(reopened.metrics()) == n_lines
    assert os.path.getsize(run.metrics_path) == load_checkpoint(
        run.checkpoints_dir / "t" / "latest.pt")["meta"]["metrics_offset"]
