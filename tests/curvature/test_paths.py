"""Cached gradient graphs vs streamed products: same matrix, the model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from flatlab.curvature import hessian_operator

from .conftest import Untouched, bn_dropout_problem, concat, dense_hessian, problem

CE = nn.functional.cross_entropy


def _pair(model, data, **kw):
    cached = hessian_operator(model, CE, data, path="cached", **kw)
    streamed = hessian_operator(model, CE, data, path="streamed", **kw)
    return cached, streamed


def _check(cached, streamed, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    V = torch.randn(H.shape[0], 3, generator=g, dtype=torch.float64)
    for op in (cached, streamed):
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=0, atol=1e-10)
        torch.testing.assert_close(op.matmat(V), H @ V, rtol=0, atol=1e-10)
        assert op.n_matvecs == 4
    torch.testing.assert_close(cached.matvec(v), streamed.matvec(v), rtol=0, atol=1e-10)
    assert cached.path == "cached" and streamed.path == "streamed"


def test_cached_and_streamed_agree_with_dense_on_unequal_batches(mlp_problem):
    model, data, H = mlp_problem
    assert len({x.shape[0] for x, _ in data}) == 3
    _check(*_pair(model, data), H)


def test_cached_and_streamed_agree_on_parameter_subset():
    model, data, _ = problem("relu")
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, CE, concat(data), names=names[2:4])
    _check(*_pair(model, data, params=model[2]), H)


def test_batchnorm_dropout_model_mode_and_parameters_untouched():
    model, data = bn_dropout_problem()
    kept = Untouched(model)
    # eval mode: BN uses running statistics, so the Hessian is that of the concatenation
    frozen = copy.deepcopy(model).eval()
    H = dense_hessian(frozen, CE, concat(data))
    _check(*_pair(model, data), H)
    kept.check()


def test_auto_path_choice_is_reported():
    model, data, _ = problem("tanh")
    v = torch.ones(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    op = hessian_operator(model, CE, data)
    assert op.path == "auto"
    op.matvec(v)
    assert op.path == "cached" and op.cache_nbytes > 0
    small = hessian_operator(model, CE, data, memory_budget=1024)  # too small: streams
    small.matvec(v)
    assert small.path == "streamed" and small.cache_nbytes > 1024
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*concat(data)),
                                         batch_size=16)
    streamed = hessian_operator(model, CE, loader)
    streamed.matvec(v)
    assert streamed.path == "streamed"
    live = hessian_operator(model, CE, data, eval_mode=False)
    live.matvec(v)
    assert live.path == "streamed"  # train-mode dropout would be frozen into a kept graph
    fwd = hessian_operator(model, CE, data, method="forward_ad")
    fwd.matvec(v)
    assert fwd.path == "streamed"
    torch.testing.assert_close(op.matvec(v), small.matvec(v), rtol=0, atol=1e-10)


def test_cached_graph_follows_in_place_parameter_changes():
    model, data, H = problem("tanh")
    model = copy.deepcopy(model)
    op = hessian_operator(model, CE, data, path="cached")
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op.matvec(v)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    H2 = dense_hessian(model, CE, concat(data))
    torch.testing.assert_close(op.matvec(v), H2 @ v, rtol=0, atol=1e-10)


def test_bad_path_settings_raise():
    model, data, _ = problem("tanh")
    with pytest.raises(ValueError, match="path must be one of"):
        hessian_operator(model, CE, data, path="memo")
    with pytest.raises(ValueError, match="path='cached' needs method"):
        hessian_operator(model, CE, data, path="cached", method="forward_ad")
    with pytest.raises(ValueError, match="memory_budget must be > 0"):
        hessian_operator(model, CE, data, memory_budget=0)
