"""flatlab.sweep.grid: seed_hash, search spaces, expansion into jobs with stable folders."""

from __future__ import annotations

import pytest

from flatlab.sweep import Job, draw_hparams, expand, finished, run_name, seed_hash

SPACE = {"lr": "log:-4:-2", "batch_size": "pow2:3:6", "rho": "uniform:0.01:0.1",
         "combine": "choice:reuse_all,perturbed_mean"}


def test_seed_hash_is_deterministic_and_spread():
    assert seed_hash("dg", 1) == seed_hash("dg", 1)
    assert 0 <= seed_hash("dg", 1) < 2**31
    assert len({seed_hash("dg", i) for i in range(100)}) == 100


def test_draws_are_in_range_default_first_and_independent_per_key():
    assert draw_hparams("dg", 0, SPACE) == {}
    draws = [draw_hparams("dg", i, SPACE) for i in range(1, 40)]
    for hp in draws:
        assert 1e-4 <= hp["lr"] <= 1e-2
        assert 8 <= hp["batch_size"] <= 64 and isinstance(hp["batch_size"], int)
        assert 0.01 <= hp["rho"] <= 0.1
        assert hp["combine"] in ("reuse_all", "perturbed_mean")
    assert len({hp["lr"] for hp in draws}) == len(draws)
    # adding a key does not change the draws of the others
    more = draw_hparams("dg", 3, {**SPACE, "alpha": "log:-4:-3"})
    assert {k: more[k] for k in SPACE} == draws[2]


def test_expand_crosses_grid_draws_and_seeds(tmp_path):
    jobs = expand("dg", tmp_path, grid={"method": ["erm", "dgsam"], "test_domains": [0, 1, 2]},
                  space={"lr": "log:-4:-2"}, n_hparams=3, seeds=[0, 1], seed_key="seeds",
                  fixed={"steps": 10}, list_keys=["seeds", "test_domains"])
    assert len(jobs) == 2 * 3 * 3 * 2
    assert len({j.run_dir for j in jobs}) == len(jobs)
    first = jobs[0].overrides
    assert first == {"steps": 10, "method": "erm", "test_domains": [0], "seeds": [0]}
    # the same draw index gives the same hyperparameters for every method and test domain
    lrs = {(j.overrides["method"], j.overrides["test_domains"][0], j.hparams_index):
           j.overrides.get("lr") for j in jobs}
    assert lrs[("erm", 0, 2)] == lrs[("dgsam", 2, 2)] is not None
    # expanding again gives the same folders
    again = expand("dg", tmp_path, grid={"method": ["erm", "dgsam"], "test_domains": [0, 1, 2]},
                   space={"lr": "log:-4:-2"}, n_hparams=3, seeds=[0, 1], seed_key="seeds",
                   fixed={"steps": 10}, list_keys=["seeds", "test_domains"])
    assert [j.run_dir for j in again] == [j.run_dir for j in jobs]


def test_job_command_and_done_marker(tmp_path):
    job = Job("dg", {"method": "dgsam", "seeds": [1], "lr": 0.001}, tmp_path / "j")
    cmd = job.command()
    assert cmd[:3] == ["flatlab", "run", "dg"]
    assert "method=dgsam" in cmd and "seeds=[1]" in cmd and "lr=0.001" in cmd
    assert cmd[-2:] == ["--out", str(tmp_path / "j")]
    assert not job.done and not finished(tmp_path / "j")
    (tmp_path / "j" / "dg-20250101-000000").mkdir(parents=True)
    assert not job.done
    (tmp_path / "j" / "dg-20250101-000000" / "done").write_text("{}")
    assert job.done
    assert run_name("dg", {"a": 1, "b": 2}) == run_name("dg", {"b": 2, "a": 1})
    wide = Job("dg", {"seeds": [1]}, tmp_path / "j", nproc=4)
    assert wide.command()[-4:] == ["--out", str(tmp_path / "j"), "--nproc", "4"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": {"method": []}}, "grid axis 'method' must have at least one value"),
        ({"seeds": []}, "seeds must hold at least one seed"),
        ({"n_hparams": 0}, "n_hparams must be >= 1"),
        ({"space": {"lr": "gauss:0:1"}}, "must start with log:, pow2:, uniform: or choice:"),
        ({"space": {"lr": "log:-2:-4"}}, "LO <= HI"),
        ({"space": {"lr": "log:a:b"}}, "with numbers"),
        ({"fixed": {"seed": 3}}, "set in one place only"),
        ({"grid": {"lr": [1]}, "space": {"lr": "log:-2:-1"}}, "set in one place only"),
    ],
)
def test_bad_sweeps(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        expand("dg", tmp_path, **kwargs)
