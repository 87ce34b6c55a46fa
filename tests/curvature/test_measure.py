"""flatlab.measure: curvature of a checkpoint (the glue behind ``flatlab measure``)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from flatlab.measure import find_checkpoint, format_results, measure_checkpoint
from flatlab.train import ConfigError, save_checkpoint

SPEC = "tests.curvature.test_measure"


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def make_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, generator=g, dtype=torch.float64)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def test_measure_run_folder(tmp_path):
    trained = make_model()
    with torch.no_grad():
        trained[0].weight.mul_(2)  # differs from a fresh make_model(): the state must be loaded
    save_checkpoint(tmp_path / "checkpoints" / "fit" / "latest.pt", {"model": trained.state_dict()})
    res = measure_checkpoint(tmp_path, model=f"{SPEC}:make_model", data=f"{SPEC}:make_data",
                             what="eig,trace,density,sharpness", k=2, probes=9, steps=10)
    from flatlab.curvature import top_eigenvalues

    x, y = make_data().tensors
    truth = top_eigenvalues(trained, k=2, loss_fn=nn.functional.cross_entropy, data=(x, y))
    assert abs(res["lambda_1"] - truth.value) < 1e-8
    for key in ("trace", "density_m1", "worst_case_l2", "first_order_flatness", "grad_norm"):
        assert key in res
    assert "lambda_1" in format_results(res)


def test_measure_pickled_module_and_errors(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", {"model": make_model()})
    res = measure_checkpoint(path, data=f"{SPEC}:make_data", what="eig", k=1)
    assert set(res) == {"lambda_1", "eig_converged", "eig_start", "n_hvps"}
    assert res["eig_start"] == "gradient"
    with pytest.raises(ConfigError, match="what must be a comma list"):
        measure_checkpoint(path, data=f"{SPEC}:make_data", what="eig,hessian")
    with pytest.raises(ConfigError, match="data must look like"):
        measure_checkpoint(path, data="nocolon")
    sd = save_checkpoint(tmp_path / "s.pt", {"model": make_model().state_dict()})
    with pytest.raises(ConfigError, match="model must be given"):
        measure_checkpoint(sd, data=f"{SPEC}:make_data")
    with pytest.raises(FileNotFoundError):
        find_checkpoint(tmp_path / "missing")


def test_cli_measure(tmp_path, capsys):
    from flatlab.cli import main

    save_checkpoint(tmp_path / "checkpoints" / "fit" / "latest.pt",
                    {"model": make_model().state_dict()})
    code = main(["measure", str(tmp_path), "--model", f"{SPEC}:make_model", "--data",
                 f"{SPEC}:make_data", "--what", "eig,trace", "--k", "2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "lambda_2" in out.out and "trace" in out.out
    assert main(["measure", str(tmp_path), "--data", f"{SPEC}:make_data"]) == 2
    assert "model must be given" in capsys.readouterr().err


def test_measure_density_writes_a_png_into_the_run_folder(tmp_path, capsys):
    import matplotlib.image

    from flatlab.cli import main

    save_checkpoint(tmp_path / "checkpoints" / "fit" / "latest.pt",
                    {"model": make_model().state_dict()})
    code = main(["measure", str(tmp_path), "--model", f"{SPEC}:make_model", "--data",
                 f"{SPEC}:make_data", "--what", "density"])
    out = capsys.readouterr()
    assert code == 0, out.err
    png = tmp_path / "plots" / "density.png"
    assert re.search(rf"^density_plot +{re.escape(str(png))}$", out.out, re.M), out.out
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.01  # something is drawn, not a blank canvas
    # from a checkpoint file inside the run folder: the same place
    png.unlink()
    measure_checkpoint(tmp_path / "checkpoints" / "fit" / "latest.pt",
                       model=f"{SPEC}:make_model", data=f"{SPEC}:make_data", what="density",
                       steps=10)
    assert png.exists()


def test_plot_density_on_given_axes_and_log_clip(tmp_path):
    from matplotlib.figure import Figure

    from flatlab.curvature import plot_density, spectral_density

    d = spectral_density(torch.diag(torch.tensor([0.0, 0.01, 0.02, 5.0], dtype=torch.float64)),
                         steps=4)
    ax = Figure().subplots()
    assert plot_density(d, ax=ax) is ax
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "eigenvalue"
    line = ax.get_lines()[0]
    assert float(min(line.get_ydata())) > 0  # clipped, so the log axis can draw it
    plot_density(d, path=tmp_path / "d.png", log=False)
    assert (tmp_path / "d.png").stat().st_size > 1000


def test_budgets_cut_each_quantity_and_say_so(tmp_path):
    """max_matvecs bounds each quantity (the partial result is marked); max_seconds bounds the
    whole measurement, and a quantity left with no time is reported unmeasured, not guessed."""
    from flatlab.measure import measure

    x, y = make_data().tensors
    loss = nn.functional.cross_entropy
    full = measure(make_model(), loss, (x, y), ["eig", "trace"], k=2, tol=1e-10, probes=20,
                   progress=False)
    assert full["eig_converged"] == 1.0 and full["trace_converged"] == 1.0
    cut = measure(make_model(), loss, (x, y), ["eig", "trace", "sharpness"], k=2, tol=1e-10,
                  probes=20, max_matvecs=5, progress=False)
    assert cut["eig_converged"] == 0.0  # 5 products cannot reach 1e-10
    assert cut["trace_converged"] == 0.0 and cut["sharpness_converged"] == 0.0
    assert cut["n_hvps"] <= 10  # 5 each for the eigenvalues and the trace
    assert cut["lambda_1"] <= full["lambda_1"] + 1e-12  # a Ritz value, from below
    tiny = measure(make_model(), loss, (x, y), ["trace"], max_matvecs=2, progress=False)
    assert tiny["trace_converged"] == 0.0 and tiny["n_hvps"] == 2  # below XTrace's 4: no error
    gone = measure(make_model(), loss, (x, y), list(("eig", "trace", "density", "sharpness")),
                   max_seconds=1e-9, progress=False)
    assert gone == {"eig_converged": 0.0, "trace_converged": 0.0, "density_converged": 0.0,
                    "sharpness_converged": 0.0, "n_hvps": 0.0}


def test_cli_measure_budget_stop_and_bad_values(tmp_path, capsys):
    from flatlab.cli import main

    save_checkpoint(tmp_path / "checkpoints" / "fit" / "latest.pt",
                    {"model": make_model().state_dict()})
    args = ["measure", str(tmp_path), "--model", f"{SPEC}:make_model", "--data",
            f"{SPEC}:make_data", "--what", "eig"]
    assert main([*args, "--stop", "value", "--tol", "1e-6", "--quiet"]) == 0
    out = capsys.readouterr()
    assert re.search(r"^eig_converged +1$", out.out, re.M) and out.err == ""  # no bar
    assert main([*args, "--tol", "1e-12", "--max-matvecs", "3", "--quiet"]) == 0
    assert re.search(r"^eig_converged +0$", capsys.readouterr().out, re.M)
    for bad, named in ((["--stop", "gap"], "--stop must be residual or value, got 'gap'"),
                       (["--tol", "0"], "--tol must be a finite number > 0, got 0.0"),
                       (["--max-seconds", "inf"], "--max-seconds must be a finite number > 0"),
                       (["--max-matvecs", "0"], "--max-matvecs must be >= 1, got 0"),
                       (["--probes", "3"], "--probes must be >= 4")):
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err
