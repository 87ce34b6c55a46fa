"""The flatness study's tasks: (data, model, step budget) and their published reference levels.

Kept apart from :mod:`flatlab.experiments.flatness` so that module reads as the protocol.

==================  =====================================  ==================================
task                data                                   model
==================  =====================================  ==================================
mnist1d_mlp         MNIST-1D, published 4,000/1,000 split  MLP 40-256-256-10, ReLU
mnist1d_cnn         MNIST-1D, published split              CNN1d, 3 strided convs (32 ch.)
digits_cnn          scikit-learn digits 8x8, 70/10/20      SmallCNN
cifar10_resnet18    CIFAR-10 pickles under ``data_dir``    ResNet-18 (4 stages, 64-512 ch.)
cifar100_wrn        CIFAR-100 pickles under ``data_dir``   WRN-28-10-sized ResNet (see below)
==================  =====================================  ==================================

Step budgets (``steps=None``, the default): 6,000 for the MLP, 3,000 for the two CNNs (where
SGD's validation accuracy has plateaued, see docs/results/flatness.md), ``cifar_epochs``
epochs for CIFAR.

Reference levels (test accuracy of the baseline, the level the SGD baseline must reach):

* MNIST-1D: Greydanus & Kobak 2020 (arXiv 2011.14439), the ``mnist1d`` README table: MLP 68%,
  CNN 94% on this split.
* digits: scikit-learn's "Recognizing hand-written digits" example, ``SVC(gamma=0.001)`` on the
  first half / second half split: 97% accuracy (96.9% measured here with the same code).
* CIFAR: to be filled from the GAM paper's tables (arXiv 2303.03108); the research note could
  not retrieve them (``shared/research/gam_sam_libs.md`` A5), so none are quoted.

The CIFAR models depart from the paper's: ``cifar10_resnet18`` is the CIFAR ResNet-18 (3x3
stem, stages of 2 basic blocks at 64/128/256/512 channels); ``cifar100_wrn`` is the
post-activation :class:`~flatlab.models.resnet.ResNet` with 3 stages of 4 blocks at
160/320/640 channels (WRN-28-10's widths and depth, without pre-activation or dropout). No
data augmentation is applied (``train.fit`` takes tensors), so expect accuracies below the
paper's crop-and-flip numbers. With ``cifar_size="tiny"`` (``--quick``) CIFAR models keep
their stages but get one block per stage at 1/16 width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

#: task -> published reference test accuracy (fraction) of the baseline, and its source
REFERENCES: dict[str, tuple[float, str]] = {
    "mnist1d_mlp": (0.68, "Greydanus & Kobak 2020, mnist1d README: MLP"),
    "mnist1d_cnn": (0.94, "Greydanus & Kobak 2020, mnist1d README: CNN"),
    "digits_cnn": (0.97, "scikit-learn digits example, SVC(gamma=0.001)"),
}


@dataclass(frozen=True)
class Task:
    """One task of the study.

    Attributes:
        splits: train / val / test ``(x, y)`` pairs (``flatlab.data.Splits``-like).
        make_model: builds a fresh model (called after seeding).
        steps: optimizer steps for this task (the same for every optimizer).
    """

    splits: Any
    make_model: Callable[[], nn.Module]
    steps: int


def _builder(name: str, splits: Any, kw: dict) -> Callable[[], nn.Module]:
    from flatlab.models import build

    return lambda: build(name, splits.input_shape, splits.num_classes, **kw)


def build_task(task: str, cfg: Any) -> Task:
    """The :class:`Task` named ``task`` under the study's config ``cfg``.

    Raises:
        ValueError: a CIFAR task without ``data_dir``, or an unknown task.
    """
    from flatlab.data import cifar10, cifar100, digits, mnist1d_standard
    from flatlab.rundir import ConfigError

    def steps(default: int) -> int:
        return cfg.steps or default

    if task == "mnist1d_mlp":
        s = mnist1d_standard(seed=0)
        return Task(s, _builder("mlp", s, {"width": 256, "depth": 2}), steps(6000))
    if task == "mnist1d_cnn":
        s = mnist1d_standard(seed=0)
        return Task(s, _builder("cnn1d", s, {}), steps(3000))
    if task == "digits_cnn":
        s = digits(size=8, seed=0)
        return Task(s, _builder("small_cnn", s, {}), steps(3000))
    if task in ("cifar10_resnet18", "cifar100_wrn"):
        if not cfg.data_dir:
            raise ConfigError(f"task {task} needs data_dir (the folder holding the CIFAR "
                              "python pickle batches), got data_dir=''")
        s = (cifar10 if task == "cifar10_resnet18" else cifar100)(cfg.data_dir, seed=0)
        if task == "cifar10_resnet18":
            kw = {"blocks": (2, 2, 2, 2), "width": 64}
        else:
            kw = {"blocks": (4, 4, 4), "width": 160}
        if cfg.cifar_size == "tiny":  # the same stage layout, one block per stage, 1/16 width
            kw = {"blocks": (1,) * len(kw["blocks"]), "width": kw["width"] // 16}
        epoch = math.ceil(s.train[0].shape[0] / cfg.batch_size)
        return Task(s, _builder("resnet", s, kw), steps(cfg.cifar_epochs * epoch))
    raise ValueError(f"task must be a known flatness task, got {task!r}")
