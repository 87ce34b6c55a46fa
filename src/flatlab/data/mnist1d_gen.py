"""MNIST-1D (Greydanus & Kobak, 2020, arXiv 2011.14439), generated locally and cached.

MNIST-1D draws each example from one of ten hand-made 1-D templates (one per digit) and
transforms it: random zero padding, dilation to a fixed length, a random scale
``1 + scale_coeff * (u - 1/2)``, a cyclic shift by up to ``max_translation`` positions,
correlated background noise (``corr_noise_scale``), i.i.d. noise (``iid_noise_scale``), a
linear shear ``x - shear_scale * (u - 1/2) * linspace(-1/2, 1/2)``, and interpolation to
``final_seq_length = 40`` points; the whole set is then standardised to mean 0, std 1.

flatlab calls the ``mnist1d`` package's own ``get_dataset_args`` and ``make_dataset`` (never
its download path), so the data match the reference generator for the same arguments.
``make_dataset`` reseeds numpy's and Python's global RNGs; this module saves and restores
both around the call, so generating data never changes a user's random stream.

Arrays are cached as ``<cache_dir>/mnist1d/<key>.npz`` (written to a temporary file and
renamed, so a crash never leaves half a file; an unreadable cache file is regenerated).
``cache_dir`` defaults to ``$FLATLAB_CACHE`` if set, else ``~/.cache/flatlab``.

With ``n=5000, seed=42`` the arrays are the reference generator's default draw: its train
part followed by its test part (``make_dataset`` is called with ``train_split=1``; flatlab
splits with its own seed).

Shapes: ``x`` float32 ``(N, 40)``, ``y`` int64 ``(N,)`` with 10 classes, ``N = 10 * (n // 10)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from flatlab._checks import check_positive_int
from flatlab.data.splits import Splits, train_val_test_split

__all__ = ["cache_root", "generate_mnist1d", "mnist1d", "mnist1d_standard", "MNIST1D_ARG_NAMES",
           "MNIST1D_STANDARD"]

#: the published split: ``get_dataset_args()`` defaults (5,000 examples, seed 42,
#: ``train_split=0.8``): the first 4,000 examples train, the last 1,000 test
MNIST1D_STANDARD = {"n": 5000, "seed": 42, "n_train": 4000}

# Generator arguments a caller may override (the rest, e.g. ``url``, are not used here).
MNIST1D_ARG_NAMES = (
    "template_len", "padding", "scale_coeff", "max_translation", "corr_noise_scale",
    "iid_noise_scale", "shear_scale", "shuffle_seq", "final_seq_length",
)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$FLATLAB_CACHE``, else ``~/.cache/flatlab``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("FLATLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flatlab"


def _make(n: int, seed: int, overrides: dict) -> tuple[np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    for k, v in overrides.items():
        setattr(args, k, v)
    args.num_samples = n
    args.seed = seed
    args.train_split = 1.0  # flatlab splits itself, with its own seed
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        out = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return out["x"].astype(np.float32), out["y"].astype(np.int64)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached arrays, or None if the file is missing or unreadable (then it is rebuilt)."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            return f["x"], f["y"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def generate_mnist1d(
    n: int = 5000,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    **overrides: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``N = 10 * (n // 10)`` MNIST-1D examples as ``(x, y)``, generated once and cached.

    Args:
        n: number of examples (``make_dataset`` draws ``n // 10`` per class).
        seed: generator seed (``args.seed``).
        cache_dir: cache folder (see :func:`cache_root`).
        **overrides: generator arguments from :data:`MNIST1D_ARG_NAMES`, e.g.
            ``max_translation=12``, ``shear_scale=1.5`` (used by the MNIST-1D domains).

    Raises:
        ValueError: if ``n < 10`` or an override is not a generator argument.
    """
    check_positive_int("n", n)
    if n < 10:
        raise ValueError(f"n must be >= 10 (one example per class), got {n}")
    unknown = sorted(set(overrides) - set(MNIST1D_ARG_NAMES))
    if unknown:
        raise ValueError(
            f"mnist1d overrides must be among {', '.join(MNIST1D_ARG_NAMES)}, got {unknown}"
        )
    spec = {"n": n, "seed": int(seed), **{k: overrides[k] for k in sorted(overrides)}}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / "mnist1d" / f"n{n}_seed{seed}_{key}.npz"
    cached = _read_cache(path)
    if cached is not None:
        x, y = cached
    else:
        x, y = _make(n, int(seed), overrides)
        _atomic_savez(path, x=x, y=y, spec=np.array(json.dumps(spec, default=str)))
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def mnist1d(
    n: int = 5000,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> Splits:
    """MNIST-1D as :class:`Splits`: 10 classes, input shape ``(40,)``, split by ``seed``.

    With the defaults (n=5000) the splits hold 3,500 / 500 / 1,000 examples.

    Example:
        >>> s = mnist1d(n=200, seed=0)  # doctest: +SKIP
        >>> s.train[0].shape  # doctest: +SKIP
        torch.Size([140, 40])
    """
    x, y = generate_mnist1d(n, seed, cache_dir)
    train, val, test = train_val_test_split(
        (x, y), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    return Splits(train, val, test, num_classes=10, input_shape=(int(x.shape[1]),), name="mnist1d")


def mnist1d_standard(
    seed: int = 0,
    val_fraction: float = 0.1,
    cache_dir: str | os.PathLike | None = None,
) -> Splits:
    """MNIST-1D on the split its authors publish results on (Greydanus & Kobak 2020).

    The reference generator's default draw (``get_dataset_args()``: 5,000 examples, seed 42,
    ``train_split=0.8``): its 4,000 training examples and its 1,000 test examples, exactly
    the arrays of ``make_dataset(get_dataset_args())`` (``x``/``y`` and ``x_test``/``y_test``).
    The test part is never touched by ``seed``; validation is ``floor(val_fraction * 4000)``
    examples carved out of the training part by a permutation seeded with ``seed``.

    With the defaults the splits hold 3,600 / 400 / 1,000 examples.

    Example:
        >>> s = mnist1d_standard()  # doctest: +SKIP
        >>> s.sizes()  # doctest: +SKIP
        {'train': 3600, 'val': 400, 'test': 1000}
    """
    from flatlab.data.splits import split_indices, subset

    x, y = generate_mnist1d(MNIST1D_STANDARD["n"], MNIST1D_STANDARD["seed"], cache_dir)
    k = MNIST1D_STANDARD["n_train"]
    train_all, test = (x[:k], y[:k]), (x[k:], y[k:])
    val_idx, train_idx = split_indices(k, (val_fraction,), seed)
    return Splits(subset(train_all, train_idx), subset(train_all, val_idx), test,
                  num_classes=10, input_shape=(int(x.shape[1]),), name="mnist1d_standard")
