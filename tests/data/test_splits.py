import pytest
import torch

from flatlab.data import Splits, in_out_split, split_indices, train_val_test_split


def _pair(n=50):
    return torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % 3


def test_split_indices_partition_and_determinism():
    parts = split_indices(103, (0.2, 0.1), seed=5)
    assert [len(p) for p in parts] == [20, 10, 73]
    assert torch.cat(parts).sort().values.tolist() == list(range(103))
    again = split_indices(103, (0.2, 0.1), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = split_indices(103, (0.2, 0.1), seed=6)
    assert not torch.equal(parts[0], other[0])


def test_split_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    split_indices(10, (0.5,), seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_train_val_test_split_sizes_and_alignment():
    train, val, test = train_val_test_split(_pair(50), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert (len(train[0]), len(val[0]), len(test[0])) == (35, 5, 10)
    for x, y in (train, val, test):
        assert torch.equal(x.squeeze(1).long() % 3, y)  # rows stay aligned with their labels
    seen = torch.cat([train[0], val[0], test[0]]).squeeze(1).sort().values
    assert torch.equal(seen, torch.arange(50, dtype=torch.float32))


def test_in_out_split_is_80_20():
    inn, out = in_out_split(_pair(50), holdout_fraction=0.2, seed=3)
    assert len(inn[0]) == 40 and len(out[0]) == 10
    assert set(inn[0].squeeze(1).tolist()).isdisjoint(out[0].squeeze(1).tolist())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"val_fraction": -0.1}, ValueError, r"fractions\[1\] must be in \[0.0, 1.0\), got -0.1"),
        ({"test_fraction": 1.0}, ValueError, r"fractions\[0\] must be in"),
        ({"val_fraction": 0.5, "test_fraction": 0.6}, ValueError, "must sum to < 1"),
        ({"val_fraction": "a"}, TypeError, "must be a real number"),
    ],
)
def test_bad_fractions(kwargs, error, match):
    with pytest.raises(error, match=match):
        train_val_test_split(_pair(), **kwargs)


def test_bad_pair():
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        in_out_split((torch.zeros(3, 1), torch.zeros(2)))
    with pytest.raises(TypeError, match="tensor pair"):
        in_out_split(torch.zeros(3))


def test_splits_properties():
    p = _pair(10)
    s = Splits(p, p, p, num_classes=3, input_shape=(1,), name="t")
    assert s.task == "classification" and s.out_dim == 3 and s.in_dim == 1
    r = Splits((p[0], torch.zeros(10, 2)), p, p, num_classes=None, input_shape=(1,), name="r")
    assert r.task == "regression" and r.out_dim == 2
    with pytest.raises(AttributeError):
        s.name = "other"  # frozen
