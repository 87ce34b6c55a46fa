"""flatlab._batches: one reading of "data" (tensor pair, list of pairs, DataLoader)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flatlab._batches import batches, total_size


def test_pair_is_one_batch() -> None:
    x, y = torch.randn(5, 3), torch.arange(5)
    out = list(batches((x, y)))
    assert len(out) == 1 and out[0][2] == 5 and out[0][0] is x


def test_list_of_unequal_batches_reports_sizes() -> None:
    data = [(torch.randn(n, 2), torch.zeros(n)) for n in (3, 5, 1)]
    assert [n for _, _, n in batches(data)] == [3, 5, 1]
    assert total_size(data) == 9


def test_dataloader_is_reiterated() -> None:
    loader = DataLoader(TensorDataset(torch.randn(10, 2), torch.zeros(10)), batch_size=4)
    assert total_size(loader) == 10 and total_size(loader) == 10


def test_tuple_inputs_are_moved_to_device() -> None:
    data = [((torch.randn(2, 3), torch.randn(2, 1)), torch.zeros(2))]
    (inputs, _, n), = list(batches(data, device=torch.device("cpu")))
    assert isinstance(inputs, tuple) and n == 2


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ([], ValueError, "data is empty"),
        ((torch.zeros(0, 2), torch.zeros(0)), ValueError, "empty batch"),
        (torch.zeros(3), TypeError, "data must be"),
        (5, TypeError, "data must be"),
        ([torch.zeros(3)], TypeError, "each batch must be"),
    ],
    ids=["empty-list", "empty-batch", "bare-tensor", "int", "not-a-pair"],
)
def test_bad_data_raises(data, error, match) -> None:
    with pytest.raises(error, match=match):
        list(batches(data))
