import pytest

from flatlab.data import DATASETS, Domains, Splits, load


def test_load_builds_named_datasets(tmp_path):
    assert isinstance(load("digits", size=8), Splits)
    s = load("mnist1d", n=100, cache_dir=tmp_path)
    assert s.input_shape == (40,)
    r = load("rotated_digits", size=8, angles=(0, 30))
    assert isinstance(r, Domains) and r.names == ("0", "30") and r.name == "rotated_digits8"
    c = load("colored_digits")
    assert c.names == ("+90%", "+80%", "-90%") and c.input_shape == (2, 16, 16)
    t = load("teacher_student_regression", n=50)
    assert t.task == "regression"


def test_load_unknown_name_lists_known():
    with pytest.raises(ValueError, match="dataset must be one of 'digits', .*got 'imagenet'"):
        load("imagenet")
    assert {"pacs", "vlcs", "office_home", "terra_incognita", "domain_net"} <= set(DATASETS)
