"""Products and Lanczos on the project's CNN and transformer (GroupNorm, attention, LayerNorm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flatlab.curvature import hessian_operator, top_eigenvalues

CE = nn.functional.cross_entropy


def _models():
    from flatlab import models

    torch.manual_seed(0)
    return {
        "mlp": (models.MLP(16, 3, width=24, depth=2, activation="tanh"), (16,)),
        "cnn": (models.SmallCNN(input_shape=(1, 8, 8), num_classes=3, channels=(4, 8)),
                (1, 8, 8)),
        "vit": (models.ViT(input_shape=(16,), num_classes=3, patch_size=4, dim=8, depth=1,
                           heads=2, mlp_ratio=2), (16,)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "vit"])
def test_kernels_agree_and_lanczos_beats_power(name):
    model, shape = _models()[name]
    model = model.double()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(24, *shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (24,), generator=g))
    ops = {m: hessian_operator(model, CE, data, method=m)
           for m in ("forward_ad", "func", "double_backward")}
    n = ops["func"].shape[0]
    V = torch.randn(n, 3, generator=g, dtype=torch.float64)
    ref = torch.stack([ops["double_backward"].matvec(c) for c in V.T], dim=1)
    for op in ops.values():
        torch.testing.assert_close(op.matvec(V[:, 0]), ref[:, 0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ops["func"].matmat(V), ref, rtol=1e-9, atol=1e-12)
    # lambda_max to relative residual 1e-4: Lanczos needs at most half of power's products
    lz = top_eigenvalues(ops["double_backward"], k=1, which="magnitude", tol=1e-4)
    pw = top_eigenvalues(ops["double_backward"], k=1, which="magnitude", tol=1e-4,
                         method="power", max_matvecs=300)
    assert lz.converged
    assert 2 * lz.n_matvecs <= pw.n_matvecs
    if pw.converged:
        assert abs(lz.value - pw.value) <= 1e-3 * abs(lz.value)
