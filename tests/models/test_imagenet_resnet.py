"""ImageNet ResNet-18/50: torchvision's layout and sizes, frozen BN, pretrained files."""

import pytest
import torch

from flatlab.models import ImageNetResNet, build, load_pretrained


@pytest.mark.parametrize("arch, params, keys", [("resnet18", 11_689_512, 122),
                                                ("resnet50", 25_557_032, 320)])
def test_sizes_and_names_are_torchvisions(arch, params, keys):
    # torchvision's published parameter counts at 1,000 classes; its state_dict key counts
    m = ImageNetResNet((3, 224, 224), 1000, arch=arch)
    sd = m.state_dict()
    assert sum(p.numel() for p in m.parameters()) == params
    assert len(sd) == keys
    assert sd["layer2.0.downsample.0.weight"].shape[2:] == (1, 1)
    assert "layer4.1.bn2.running_var" in sd and "fc.bias" in sd
    if arch == "resnet50":
        assert sd["layer1.0.conv3.weight"].shape == (256, 64, 1, 1)
        assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
        assert m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)


def test_forward_shapes_features_and_registry():
    m = build("resnet50", (3, 32, 32), 5)
    x = torch.randn(2, 3, 32, 32)
    assert m(x).shape == (2, 5) and m.features(x).shape == (2, 2048)
    small = build("resnet18", (1, 20, 20), 3, dropout=0.5)
    assert small(torch.randn(4, 1, 20, 20)).shape == (4, 3) and small.fc.in_features == 512
    with pytest.raises(ValueError, match="arch must be one of"):
        ImageNetResNet(arch="resnet19")
    with pytest.raises(ValueError, match="dropout must be in"):
        ImageNetResNet(dropout=1.0)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode():
    torch.manual_seed(0)
    m = ImageNetResNet((3, 32, 32), 4, arch="resnet18", dropout=0.5, freeze_bn=True).train()
    before = m.bn1.running_mean.clone()
    assert m.training and m.dropout.training and not m.bn1.training
    assert not any(b.training for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d))
    m(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(m.bn1.running_mean, before)
    free = ImageNetResNet((3, 32, 32), 4, arch="resnet18").train()
    free(torch.randn(4, 3, 32, 32) + 1)
    assert not torch.equal(free.bn1.running_mean, torch.zeros(64))


def test_load_pretrained_keeps_a_fresh_classifier_and_cycles_channels(tmp_path):
    torch.manual_seed(0)
    imagenet = ImageNetResNet((3, 32, 32), 1000, arch="resnet18")
    with torch.no_grad():
        imagenet.bn1.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()}},
               path)
    torch.manual_seed(1)
    model = ImageNetResNet((3, 32, 32), 7, arch="resnet18")
    fc = model.fc.weight.detach().clone()
    info = load_pretrained(model, path)
    assert info.loaded == 120 and info.kept == ("fc.weight", "fc.bias")
    assert torch.equal(model.fc.weight, fc)
    for key, value in imagenet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    # the same classifier shape loads too; a 1-channel stem takes channel 0 (i mod 3)
    gray = ImageNetResNet((1, 32, 32), 1000, arch="resnet18")
    assert load_pretrained(gray, path).kept == ()
    assert torch.equal(gray.conv1.weight, imagenet.conv1.weight[:, :1])
    assert torch.equal(gray.fc.weight, imagenet.fc.weight)


def test_load_pretrained_names_what_does_not_fit(tmp_path):
    m18 = ImageNetResNet((3, 32, 32), 10, arch="resnet18")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_pretrained(m18, tmp_path / "nowhere.pth")
    sd = m18.state_dict()
    del sd["layer3.1.bn2.bias"]
    torch.save(sd, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match="missing key 'layer3.1.bn2.bias'"):
        load_pretrained(ImageNetResNet((3, 32, 32), 10, arch="resnet18"), tmp_path / "cut.pth")
    torch.save(ImageNetResNet((3, 32, 32), 10, arch="resnet50").state_dict(), tmp_path / "50.pth")
    with pytest.raises(ValueError, match=r"does not fit resnet18: unexpected key .* more\)"):
        load_pretrained(m18, tmp_path / "50.pth")
    sd = ImageNetResNet((3, 32, 32), 10, arch="resnet18").state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"'layer1.0.conv1.weight' has shape \(64, 64, 1, 1\)"):
        load_pretrained(m18, tmp_path / "shape.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="torch.save'd state_dict"):
        load_pretrained(m18, tmp_path / "text.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="must hold a state_dict of tensors"):
        load_pretrained(m18, tmp_path / "list.pth")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_same_logits_as_torchvision_when_it_is_installed(arch, tmp_path):
    """Runs only where torchvision imports (flatlab never depends on it)."""
    torchvision = pytest.importorskip("torchvision")
    tv = getattr(torchvision.models, arch)().eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    ours = ImageNetResNet((3, 64, 64), 1000, arch=arch).eval()
    assert list(ours.state_dict()) == list(tv.state_dict())
    load_pretrained(ours, tmp_path / "tv.pth")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
