import random

import numpy as np
import pytest
import torch

from flatlab.data import digits, generate_mnist1d, mnist1d


@pytest.mark.parametrize("size", [8, 16])
def test_digits_shapes_dtypes_ranges(size):
    s = digits(size=size, seed=0)
    x, y = s.train
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape[1:] == (1, size, size) and s.input_shape == (1, size, size)
    assert sum(s.sizes().values()) == 1797 and s.sizes()["test"] == 359
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert set(torch.cat([s.train[1], s.val[1], s.test[1]]).tolist()) == set(range(10))
    assert s.num_classes == 10 and s.name == f"digits{size}"


def test_digits_seed_controls_split():
    a, b, c = digits(seed=0), digits(seed=0), digits(seed=1)
    assert torch.equal(a.test[0], b.test[0])
    assert not torch.equal(a.test[0], c.test[0])


def test_digits_bad_size():
    with pytest.raises(ValueError, match="size must be one of 8, 16, got 12"):
        digits(size=12)


def test_mnist1d_matches_reference_generator_and_caches(tmp_path):
    from mnist1d.data import get_dataset_args, make_dataset

    x, y = generate_mnist1d(n=100, seed=3, cache_dir=tmp_path)
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = 100, 3, 1.0
    ref = make_dataset(args)
    assert torch.allclose(x, torch.from_numpy(ref["x"]).float())
    assert torch.equal(y, torch.from_numpy(ref["y"]).long())
    files = list((tmp_path / "mnist1d").glob("*.npz"))
    assert len(files) == 1 and not list((tmp_path / "mnist1d").glob("*.tmp"))
    # the second call reads the cache: make the cached file recognisably different
    with np.load(files[0]) as f:
        arrays = dict(f)
    arrays["x"] = arrays["x"] + 1.0
    np.savez(files[0], **arrays)
    x2, _ = generate_mnist1d(n=100, seed=3, cache_dir=tmp_path)
    assert torch.allclose(x2, x + 1.0)


def test_mnist1d_cache_env_and_global_rng(tmp_path, monkeypatch):
    monkeypatch.setenv("FLATLAB_CACHE", str(tmp_path / "env"))
    np.random.seed(1)
    random.seed(1)
    expected = (np.random.rand(), random.random())
    np.random.seed(1)
    random.seed(1)
    s = mnist1d(n=200, seed=0)
    assert (np.random.rand(), random.random()) == expected  # global RNGs untouched
    assert list((tmp_path / "env" / "mnist1d").glob("*.npz"))
    assert s.input_shape == (40,) and s.num_classes == 10
    assert s.sizes() == {"train": 140, "val": 20, "test": 40}
    assert s.train[0].dtype == torch.float32 and s.train[1].dtype == torch.int64


def test_mnist1d_overrides_change_data_and_are_checked(tmp_path):
    a, _ = generate_mnist1d(n=50, seed=0, cache_dir=tmp_path)
    b, _ = generate_mnist1d(n=50, seed=0, cache_dir=tmp_path, shear_scale=3.0)
    assert not torch.allclose(a, b)
    assert len(list((tmp_path / "mnist1d").glob("*.npz"))) == 2
    with pytest.raises(ValueError, match="overrides must be among .* got \\['url'\\]"):
        generate_mnist1d(n=50, cache_dir=tmp_path, url="x")
    with pytest.raises(ValueError, match="n must be >= 10"):
        generate_mnist1d(n=5, cache_dir=tmp_path)


def test_mnist1d_corrupt_cache_is_regenerated(tmp_path):
    x, y = generate_mnist1d(n=50, seed=1, cache_dir=tmp_path)
    (path,) = (tmp_path / "mnist1d").glob("*.npz")
    path.write_bytes(b"not a zip file")
    x2, y2 = generate_mnist1d(n=50, seed=1, cache_dir=tmp_path)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with np.load(path) as f:  # rewritten, readable again
        assert f["x"].shape == (50, 40)


def test_digits_calls_do_not_share_memory():
    a = digits(seed=0)
    a.train[0].add_(1.0)  # a caller mutating its tensors in place
    b = digits(seed=0)
    assert float(b.train[0].max()) <= 1.0
