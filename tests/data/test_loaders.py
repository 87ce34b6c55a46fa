"""Real-data loaders on tiny fixtures the tests write: IDX files, CIFAR pickles, image folders."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from flatlab.data import (
    cifar10,
    cifar100,
    fashion_mnist,
    image_folder,
    load,
    mnist,
    read_cifar_batch,
    read_idx,
)


def _write_idx(path, array, gz):
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 5
    assert np.array_equal(read_idx(_write_idx(tmp_path / "a", a, gz)), a)
    f = np.linspace(0, 1, 6, dtype=np.float32).reshape(3, 2)
    assert np.array_equal(read_idx(_write_idx(tmp_path / "f", f, gz)), f)


def test_read_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="IDX file not found: .*missing"):
        read_idx(tmp_path / "missing")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(ValueError, match="promises 5 data bytes .* got 1"):
        read_idx(tmp_path / "short")


def _mnist_fixture(folder, gz, n_train=20, n_test=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, a in arrays.items():
        _write_idx(folder / name, a, gz)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_idx(tmp_path, gz):
    arrays = _mnist_fixture(tmp_path, gz)
    s = mnist(tmp_path, val_fraction=0.25, seed=0)
    assert s.sizes() == {"train": 15, "val": 5, "test": 6}
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10 and s.name == "MNIST"
    x, y = s.test
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"] / 255.0).float()
    assert torch.allclose(x[:, 0], expected)
    assert torch.equal(y, torch.arange(6) % 10)


def test_fashion_mnist_torchvision_layout(tmp_path):
    _mnist_fixture(tmp_path / "FashionMNIST" / "raw", gz=True)
    s = fashion_mnist(tmp_path)
    assert s.name == "FashionMNIST" and sum(s.sizes().values()) == 26


def test_mnist_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST data directory not found: .*nowhere"):
        mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[.gz\] not found"):
        mnist(tmp_path)


def _cifar_batch(path, n, label_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = list(rng.integers(0, num_classes, n))
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, label_key.encode(): labels}, f)
    return data, labels


def test_cifar10_from_pickle_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    parts = [_cifar_batch(d / f"data_batch_{i}", 4, "labels", 10, i) for i in range(1, 6)]
    test_data, test_labels = _cifar_batch(d / "test_batch", 3, "labels", 10, 9)
    s = cifar10(tmp_path, val_fraction=0.2, normalize=False)
    assert s.sizes() == {"train": 16, "val": 4, "test": 3} and s.input_shape == (3, 32, 32)
    x, y = s.test
    # channel-major layout: the first 1024 values are the red plane, row-major
    expected = torch.from_numpy(test_data.reshape(3, 3, 32, 32) / 255.0).float()
    assert torch.allclose(x, expected) and y.tolist() == [int(v) for v in test_labels]
    assert x[0, 0, 0, 1] == pytest.approx(test_data[0, 1] / 255.0)
    assert x[0, 1, 0, 0] == pytest.approx(test_data[0, 1024] / 255.0)
    all_train = sorted(int(v) for p in parts for v in p[1])
    assert sorted(torch.cat([s.train[1], s.val[1]]).tolist()) == all_train
    norm = cifar10(tmp_path / "cifar-10-batches-py", val_fraction=0.0)  # the folder itself
    xtr = norm.train[0]
    assert torch.allclose(xtr.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(xtr.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)


def test_cifar100_fine_and_coarse(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 6), ("test", 2)):
        rng = np.random.default_rng(n)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": list(range(90, 90 + n)),
                         b"coarse_labels": list(range(n))}, f)
    fine = cifar100(tmp_path, val_fraction=0.0)
    coarse = cifar100(tmp_path, val_fraction=0.0, labels="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert fine.test[1].tolist() == [90, 91] and coarse.test[1].tolist() == [0, 1]


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="CIFAR data directory not found: .*absent"):
        cifar10(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="CIFAR batch not found: .*data_batch_1"):
        cifar10(tmp_path)
    with open(tmp_path / "b", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8)}, f)
    with pytest.raises(KeyError, match="must have key 'labels'"):
        read_cifar_batch(tmp_path / "b")


def _image_folder_fixture(root):
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for domain in ("sketch", "photo"):  # written out of order: loader must sort
        for cls, rgb in colours.items():
            folder = root / "TOY" / domain / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (10 + i, 12), rgb).save(folder / f"{i}.png")
    (root / "TOY" / "photo" / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_two_domains_two_classes(tmp_path):
    _image_folder_fixture(tmp_path)
    d = image_folder(tmp_path, "TOY", size=8, normalize=False)
    assert d.names == ("photo", "sketch")  # sorted domain order
    assert d.num_classes == 2 and d.input_shape == (3, 8, 8) and d.name == "TOY"
    assert d.sizes() == {"photo": 6, "sketch": 6}
    x, y = d["photo"]
    assert x.dtype == torch.float32 and y.tolist() == [0, 0, 0, 1, 1, 1]  # cat=0, dog=1
    assert torch.allclose(x[0, :, 3, 3], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(x[5, :, 3, 3], torch.tensor([0.0, 0.0, 1.0]))
    norm = image_folder(tmp_path / "TOY", size=4, max_per_class=1)
    assert norm.sizes() == {"photo": 2, "sketch": 2}
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225])
    assert torch.allclose(norm["sketch"][0][0, :, 0, 0], red, atol=1e-5)
    only = image_folder(tmp_path, "TOY", size=4, domains=["sketch"])
    assert only.names == ("sketch",)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory not found: .*PACS"):
        image_folder(tmp_path, "PACS")
    with pytest.raises(FileNotFoundError, match="directory not found: .*PACS"):
        load("pacs", root=tmp_path)
    _image_folder_fixture(tmp_path)
    with pytest.raises(FileNotFoundError, match="domain directory not found: .*cartoon"):
        image_folder(tmp_path, "TOY", domains=["cartoon"])
    bad = tmp_path / "TOY" / "photo" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="decodable by Pillow, got .*broken.png"):
        image_folder(tmp_path, "TOY")
    bad.unlink()
    (tmp_path / "TOY" / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="domain .*empty must contain images"):
        image_folder(tmp_path, "TOY")
