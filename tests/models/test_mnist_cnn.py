"""MNISTCNN computes exactly DomainBed's ERM network for MNIST: ``MNIST_CNN`` (networks.py,
facebookresearch/DomainBed b93c22a) followed by ``Classifier`` = ``nn.Linear(128, classes)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flatlab.models import MNISTCNN, build


class DomainBedMNISTCNN(nn.Module):
    """A transcription of DomainBed's ``MNIST_CNN`` featurizer plus the linear classifier."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, 1, padding=1)
        self.conv2 = nn.Conv2d(64, 128, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.conv4 = nn.Conv2d(128, 128, 3, 1, padding=1)
        self.bn0 = nn.GroupNorm(8, 64)
        self.bn1 = nn.GroupNorm(8, 128)
        self.bn2 = nn.GroupNorm(8, 128)
        self.bn3 = nn.GroupNorm(8, 128)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x):
        x = self.bn0(F.relu(self.conv1(x)))
        x = self.bn1(F.relu(self.conv2(x)))
        x = self.bn2(F.relu(self.conv3(x)))
        x = self.bn3(F.relu(self.conv4(x)))
        x = self.avgpool(x).view(len(x), -1)  # (B, 128)
        return self.classifier(x)


@pytest.mark.parametrize(("shape", "classes"), [((1, 28, 28), 10), ((2, 28, 28), 2)])
def test_mnist_cnn_equals_domainbeds_network(shape, classes):
    torch.manual_seed(0)
    ref = DomainBedMNISTCNN(shape, classes).double()
    ours = build("mnist_cnn", shape, classes).double()
    assert isinstance(ours, MNISTCNN)
    ref_params = [p for _, p in ref.named_parameters()]
    ours_params = [p for _, p in ours.named_parameters()]
    # same parameters, in DomainBed's order: conv1..4 (weight, bias), norms, classifier
    order = ["conv1", "bn0", "conv2", "bn1", "conv3", "bn2", "conv4", "bn3", "classifier"]
    ref_params = [p for name in order for p in getattr(ref, name).parameters()]
    assert [p.shape for p in ref_params] == [p.shape for p in ours_params]
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        for a, b in zip(ours_params, ref_params):
            a.copy_(torch.randn_like(a) * 0.1)
            b.copy_(a)
    x = torch.rand(4, *shape, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    # gradients agree too (what DGSAM / SAM see)
    ours(x).sum().backward()
    ref(x).sum().backward()
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_domainbed_parameter_count_for_rotated_mnist():
    # 28x28 grey: convs 640 + 73,856 + 2 x 147,584, GroupNorms 2 (64 + 3 x 128), linear 1,290
    expected = 640 + 73856 + 2 * 147584 + 2 * (64 + 3 * 128) + 1290
    assert sum(p.numel() for p in MNISTCNN((1, 28, 28), 10).parameters()) == expected
