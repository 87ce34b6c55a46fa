"""Filter-normalized loss slices."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatlab.curvature import filter_normalized_direction, loss_landscape, plot_landscape

from .conftest import make_batches, make_mlp


def test_filter_normalization_per_row():
    model = make_mlp("tanh")
    w = [p.detach() for p in model.parameters()]
    d = filter_normalized_direction(w, generator=torch.Generator().manual_seed(0))
    for wi, di in zip(w, d):
        if wi.dim() == 1:
            assert torch.count_nonzero(di) == 0
        else:
            torch.testing.assert_close(di.norm(dim=1), wi.norm(dim=1))
    d2 = filter_normalized_direction(w, generator=torch.Generator().manual_seed(0), ignore_1d=False)
    assert abs(float(d2[1].norm()) - float(w[1].norm())) < 1e-12


def test_slices_match_direct_evaluation_and_leave_model_alone(tmp_path):
    model = make_mlp("relu")
    data = make_batches()
    before = copy.deepcopy(model.state_dict())
    ce = nn.functional.cross_entropy
    r1 = loss_landscape(model, ce, data, points=5, span=0.5)
    assert r1.losses.shape == (5,) and r1.betas is None
    # check one point by moving a copy of the model
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(moved.parameters(), r1.directions[0]):
            p.add_(0.25 * d)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    with torch.no_grad():
        assert abs(float(ce(moved(x), y)) - float(r1.losses[3])) < 1e-12
        assert abs(r1.value - float(ce(model(x), y))) < 1e-12
    r2 = loss_landscape(model, ce, data, dims=2, points=3)
    assert r2.losses.shape == (3, 3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    plot_landscape(r1, path=str(tmp_path / "line.png"))
    plot_landscape(r2, path=str(tmp_path / "plane.png"))
    assert (tmp_path / "line.png").stat().st_size > 0 and (tmp_path / "plane.png").exists()
    with pytest.raises(ValueError, match="dims must be 1 or 2, got 3"):
        loss_landscape(model, ce, data, dims=3)


def test_curvature_imports_only_torch_numpy_at_module_level():
    """matplotlib only inside plot_landscape; nothing from train/report/experiments."""
    import ast
    from pathlib import Path

    import flatlab.curvature

    allowed = {"torch", "numpy", "flatlab", "__future__", "dataclasses", "typing", "math",
               "collections", "contextlib", "warnings", "functools", "sys", "time"}
    for path in Path(flatlab.curvature.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] in allowed, (path.name, name)
                if name.startswith("flatlab."):
                    own = ("curvature", "_checks", "_batches", "_ranks")
                    assert name.split(".")[1] in own, name
