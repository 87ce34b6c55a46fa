"""MNIST-1D on its published split: the reference generator's own train and test arrays."""

from __future__ import annotations

import numpy as np
import torch

from flatlab.data import load, mnist1d_standard


def test_standard_split_is_the_reference_train_test_split(tmp_path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())  # 5000 examples, seed 42, train_split 0.8
    s = mnist1d_standard(seed=0, cache_dir=tmp_path)
    assert s.sizes() == {"train": 3600, "val": 400, "test": 1000}
    assert np.allclose(s.test[0].numpy(), ref["x_test"], atol=1e-6)
    assert np.array_equal(s.test[1].numpy(), ref["y_test"])
    # train + val is exactly the reference training set, each example once
    tv = torch.cat([s.train[0], s.val[0]]).numpy()
    ref_rows = {r.tobytes() for r in ref["x"].astype(np.float32)}
    assert {r.tobytes() for r in tv} == ref_rows and len(tv) == 4000
    # the seed moves validation only, never the test set
    s1 = mnist1d_standard(seed=1, cache_dir=tmp_path)
    assert torch.equal(s1.test[0], s.test[0]) and not torch.equal(s1.val[0], s.val[0])
    assert load("mnist1d_standard", cache_dir=tmp_path).name == "mnist1d_standard"
