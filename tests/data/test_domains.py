import math

import pytest
import torch

from flatlab.data import Domains, Splits, colored, digits, mnist1d_domains, rotate_images, rotated


def _base(n=12000, size=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) + 0.01  # every pixel nonzero
    return x, torch.randint(0, 10, (n,), generator=g)


def test_rotate_images_matches_rot90_and_identity():
    x = torch.rand(3, 2, 7, 7)
    assert torch.allclose(rotate_images(x, 90), torch.rot90(x, 1, dims=(-2, -1)), atol=1e-6)
    assert torch.allclose(rotate_images(x, -90), torch.rot90(x, -1, dims=(-2, -1)), atol=1e-6)
    assert torch.equal(rotate_images(x, 0), x)
    # 45 degrees keeps the centre pixel and zero-fills the corners
    r = rotate_images(torch.ones(1, 1, 9, 9), 45)
    assert float(r[0, 0, 4, 4]) == pytest.approx(1.0)
    assert float(r[0, 0, 0, 0]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="must be square"):
        rotate_images(torch.zeros(1, 1, 4, 5), 10)


def test_rotated_domains_partition_and_angles():
    base = _base(600)
    d = rotated(base, angles=(0, 15, 30, 45, 60, 75), seed=1)
    assert d.names == ("0", "15", "30", "45", "60", "75") and len(d) == 6
    assert sum(d.sizes().values()) == 600 and set(d.sizes().values()) == {100}
    assert d.input_shape == (1, 6, 6) and d.num_classes == 10
    # domain 0 is unrotated: its images are exactly base images with their labels
    x0, y0 = d["0"]
    lookup = {tuple(x.flatten().tolist()): int(y) for x, y in zip(*base)}
    assert all(lookup[tuple(x.flatten().tolist())] == int(y) for x, y in zip(x0, y0))
    # domain i is rotate(., angle_i) of its base images: check through a 90-degree build
    d90 = rotated(base, angles=(0, 90), seed=1)
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(1))  # round robin
    x90, y90 = d90["90"]
    assert torch.equal(y90, base[1][perm[1::2]])
    assert torch.allclose(x90, torch.rot90(base[0][perm[1::2]], 1, dims=(-2, -1)), atol=1e-6)


def test_rotated_accepts_splits_and_names_it():
    d = rotated(digits(size=16), angles=(0, 30))
    assert d.name == "rotated_digits16" and sum(d.sizes().values()) == 1797


def test_colored_mnist_statistics():
    x, digit = _base(12000)
    d = colored((x, digit), seed=0)
    assert d.names == ("+90%", "+80%", "-90%") and d.num_classes == 2
    assert d.input_shape == (2, 6, 6)
    # recover each example's digit through its (unique) image
    digit_of = {tuple(img.flatten().tolist()): int(t) for img, t in zip(x, digit)}
    noise, total = 0, 0
    for (xd, yd), agree in zip(d, (0.9, 0.8, 0.1)):
        assert xd.shape[1] == 2 and yd.dtype == torch.int64
        on = xd.flatten(2).abs().sum(-1) > 0  # (n, 2): which channel holds the image
        assert torch.all(on.sum(1) == 1)  # exactly one channel is lit
        colour = on[:, 1].long()
        assert abs(float((colour == yd).float().mean()) - agree) < 0.02
        img = xd.sum(1, keepdim=True)
        true = torch.tensor([digit_of[tuple(i.flatten().tolist())] < 5 for i in img]).long()
        noise += int((true != yd).sum())
        total += len(yd)
    assert abs(noise / total - 0.25) < 0.02


def test_colored_is_deterministic_and_validates():
    base = _base(300)
    a, b = colored(base, seed=4), colored(base, seed=4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    with pytest.raises(ValueError, match="1 channel"):
        colored((torch.rand(10, 3, 4, 4), torch.zeros(10, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"flip_probs\[0\] must be in \[0.0, 1.0\], got 1.5"):
        colored(base, flip_probs=(1.5,))
    with pytest.raises(ValueError, match="images"):
        colored((torch.rand(10, 4), torch.zeros(10, dtype=torch.long)))


def test_domains_api():
    x, y = torch.arange(20.0).view(10, 2), torch.arange(10) % 2
    d = Domains(("a", "b"), ((x, y), (x[:5], y[:5])), 2, (2,), "toy")
    assert list(d) == [d["a"], d[1]] and d.index("b") == 1
    train, test = d.leave_out("a")
    assert train.names == ("b",) and test.names == ("a",)
    inn, out = d.in_out_split(holdout_fraction=0.2, seed=0)
    assert inn.sizes() == {"a": 8, "b": 4} and out.sizes() == {"a": 2, "b": 1}
    assert torch.equal(torch.cat([inn["a"][0], out["a"][0]]).sort(0).values[:, 0], x[:, 0])
    px, py = d.pooled()
    assert px.shape == (15, 2) and py.shape == (15,)
    with pytest.raises(KeyError, match="domain must be one of 'a', 'b', got 'c'"):
        d["c"]
    with pytest.raises(IndexError, match="got 2"):
        d[2]
    with pytest.raises(ValueError, match="unique"):
        Domains(("a", "a"), ((x, y), (x, y)), 2, (2,), "dup")
    from flatlab._batches import batches
    assert [n for _, _, n in batches(d)] == [10, 5]  # a Domains is valid flatlab data


def test_mnist1d_domains_differ(tmp_path):
    d = mnist1d_domains(n=100, seed=0, cache_dir=tmp_path)
    assert d.names == ("shift", "scale", "shear", "noise")
    assert d.input_shape == (40,) and d.num_classes == 10 and set(d.sizes().values()) == {100}
    # the noise domain is rougher: larger mean squared first difference than the shift domain
    rough = {n: float(x.diff(dim=1).pow(2).mean()) for n, (x, _) in d.items()}
    assert rough["noise"] > rough["shift"]
    inn, out = d.in_out_split()
    assert inn.sizes()["shift"] == 80 and out.sizes()["noise"] == 20
    assert not math.isnan(float(d["shear"][0].mean()))


def test_merge_base_rejects_bad_input():
    with pytest.raises(TypeError, match="base must be a Splits"):
        rotated([1, 2, 3])
    s = digits()
    assert isinstance(s, Splits)
