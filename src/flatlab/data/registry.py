"""``flatlab.data.load(name, **kw)``: every dataset by name, for configs.

The registry is an explicit dict (no ``globals()`` lookups): :data:`DATASETS` maps a name to a
builder; keyword arguments go to the builder unchanged. Single-distribution datasets return a
:class:`~flatlab.data.splits.Splits`, multi-domain ones a :class:`~flatlab.data.domains.Domains`.

Composite names build the DomainBed synthetic datasets on a base: ``rotated_digits``
(RotatedMNIST's six angles on 16x16 digits), ``colored_digits`` (ColoredMNIST on digits),
``rotated_mnist`` / ``colored_mnist`` (on MNIST IDX files under ``root``). Their keyword
arguments are split between the base loader (``root``, ``size``) and the domain builder
(``angles``, ``flip_probs``, ``label_noise``, ``seed``).
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
from flatlab.data.splits import Splits
from flatlab.data.synthetic import teacher_student_classification, teacher_student_regression
from flatlab.data.tabular import digits

__all__ = ["DATASETS", "load"]


def _rotated_digits(size: int = 16, **kw: Any) -> Domains:
    return rotated(digits(size=size), name=f"rotated_digits{size}", **kw)


def _colored_digits(size: int = 16, **kw: Any) -> Domains:
    return colored(digits(size=size), name=f"colored_digits{size}", **kw)


def _rotated_mnist(root: str, **kw: Any) -> Domains:
    return rotated(mnist(root), name="rotated_mnist", **kw)


def _colored_mnist(root: str, **kw: Any) -> Domains:
    return colored(mnist(root), name="colored_mnist", **kw)


DATASETS: dict[str, Callable[..., Splits | Domains]] = {
    "digits": digits,
    "mnist1d": mnist1d,
    "mnist1d_standard": mnist1d_standard,
    "teacher_student_regression": teacher_student_regression,
    "teacher_student_classification": teacher_student_classification,
    "mnist": mnist,
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
