"""Every instrument takes (model, loss_fn, data, ...) positionally; operators keep (op, k)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab import curvature
from flatlab.curvature import hessian_operator, top_eigenvalues

from .conftest import concat, problem

CE = nn.functional.cross_entropy


def _small():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(1)
    return model, (torch.randn(24, 3, generator=g, dtype=torch.float64),
                   torch.randint(0, 2, (24,), generator=g))


# name -> (positional call, the same by keyword or through an operator): equal values
INSTRUMENTS = {
    "hessian_operator": (lambda m, d: hessian_operator(m, CE, d).to_dense(),
                         lambda m, d: hessian_operator(model=m, loss_fn=CE, data=d).to_dense()),
    "ggn_operator": (lambda m, d: curvature.ggn_operator(m, CE, d).to_dense(),
                     lambda m, d: curvature.ggn_operator(model=m, loss_fn=CE, data=d).to_dense()),
    "top_eigenvalues": (lambda m, d: top_eigenvalues(m, CE, d, 2).values,
                        lambda m, d: top_eigenvalues(hessian_operator(m, CE, d), 2).values),
    "top_eigenvalues_which": (
        lambda m, d: top_eigenvalues(m, CE, d, 2, "smallest").values,
        lambda m, d: top_eigenvalues(hessian_operator(m, CE, d), 2, "smallest").values),
    "hessian_trace": (lambda m, d: curvature.hessian_trace(m, CE, d, probes=10,
                                                           method="xtrace").value,
                      lambda m, d: curvature.hessian_trace(hessian_operator(m, CE, d),
                                                           probes=10).value),
    # "auto" on a model takes the exact route here (a tanh MLP): positional = keywords
    "hessian_trace_auto": (lambda m, d: curvature.hessian_trace(m, CE, d, probes=10).value,
                           lambda m, d: curvature.hessian_trace(m, loss_fn=CE,
                                                                data=d, probes=10).value),
    "spectral_density": (lambda m, d: curvature.spectral_density(m, CE, d, steps=8).nodes,
                         lambda m, d: curvature.spectral_density(hessian_operator(m, CE, d),
                                                                 steps=8).nodes),
    "worst_case_sharpness": (lambda m, d: curvature.worst_case_sharpness(m, CE, d, 0.05).value,
                             lambda m, d: curvature.worst_case_sharpness(
                                 model=m, loss_fn=CE, data=d, rho=0.05).value),
    "average_sharpness": (lambda m, d: curvature.average_sharpness(m, CE, d, 0.05,
                                                                   samples=4).value,
                          lambda m, d: curvature.average_sharpness(
                              model=m, loss_fn=CE, data=d, rho=0.05, samples=4).value),
    "first_order_flatness": (lambda m, d: curvature.first_order_flatness(m, CE, d, 0.05,
                                                                         steps=3).value,
                             lambda m, d: curvature.first_order_flatness(
                                 model=m, loss_fn=CE, data=d, rho=0.05, steps=3).value),
    "gradient_norm": (lambda m, d: curvature.gradient_norm(m, CE, d).value,
                      lambda m, d: curvature.gradient_norm(model=m, loss_fn=CE, data=d).value),
    "domain_sharpness": (lambda m, d: curvature.domain_sharpness(
                             m, CE, {"a": (d[0][:12], d[1][:12]), "b": (d[0][12:], d[1][12:])},
                             0.05, steps=3).mean,
                         lambda m, d: curvature.domain_sharpness(
                             model=m, loss_fn=CE, rho=0.05, steps=3,
                             domains={"a": (d[0][:12], d[1][:12]),
                                      "b": (d[0][12:], d[1][12:])}).mean),
    "loss_landscape": (lambda m, d: curvature.loss_landscape(m, CE, d, dims=1, points=3).losses,
                       lambda m, d: curvature.loss_landscape(model=m, loss_fn=CE, data=d,
                                                             dims=1, points=3).losses),
}


def test_every_public_instrument_is_in_the_table():
    measuring = {"hessian_operator", "ggn_operator", "top_eigenvalues", "hessian_trace",
                 "spectral_density", "worst_case_sharpness", "average_sharpness",
                 "first_order_flatness", "gradient_norm", "domain_sharpness", "loss_landscape"}
    assert measuring <= {n.removesuffix("_which") for n in INSTRUMENTS}
    assert measuring <= set(curvature.__all__)


@pytest.mark.parametrize("name", list(INSTRUMENTS))
def test_positional_model_loss_data(name):
    model, data = _small()
    positional, other = INSTRUMENTS[name]
    a, b = positional(model, data), other(model, data)
    assert torch.allclose(torch.as_tensor(a), torch.as_tensor(b), rtol=1e-8, atol=1e-10)


def test_top_eigenvalues_positional_forms_agree_with_dense():
    model, data, H = problem("tanh")
    truth = torch.linalg.eigvalsh(H).flip(0)[:3]
    by_model = top_eigenvalues(model, CE, data, 3)
    by_op = top_eigenvalues(hessian_operator(model, CE, data), 3)
    by_tensor = top_eigenvalues(H, 3)
    keywords = top_eigenvalues(model, k=3, loss_fn=CE, data=data)
    for res in (by_model, by_op, by_tensor, keywords):
        assert torch.allclose(res.values, truth, rtol=1e-6)
    assert concat(data)[0].shape[0] == 40


def test_old_positional_order_is_refused_with_the_new_one_named():
    model, data = _small()
    with pytest.raises(TypeError, match=r"top_eigenvalues\(model, loss_fn, data, k"):
        top_eigenvalues(model, 2, loss_fn=CE, data=data)
    with pytest.raises(TypeError, match="both positionally and by keyword"):
        top_eigenvalues(model, CE, data, loss_fn=CE)
    with pytest.raises(TypeError, match="at most 3 positional"):
        top_eigenvalues(torch.eye(3), 1, "largest", 5)
