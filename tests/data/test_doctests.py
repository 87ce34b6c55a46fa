"""The ``>>>`` examples in flatlab.data's and flatlab.models' docstrings stay true."""

import doctest
import importlib

import pytest

MODULES = [
    "flatlab.data.tabular", "flatlab.data.domains", "flatlab.data.synthetic",
    "flatlab.data.registry", "flatlab.models.mlp", "flatlab.models.cnn", "flatlab.models.resnet",
    "flatlab.models.vit", "flatlab.models.mixer", "flatlab.models.registry",
    "flatlab.models.imagenet_resnet", "flatlab.data.augment",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
