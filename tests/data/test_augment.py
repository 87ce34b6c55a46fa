"""DomainBed's augmentation: exact limits, colour maths, determinism, and fit's resume."""

import pytest
import torch

from flatlab.data.augment import IMAGENET_MEAN, IMAGENET_STD, DomainBedAugment, adjust_hue
from flatlab.train import Callback, Checkpoint, build_optimizer, fit

OFF = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "flip": 0.0, "jitter": 0.0, "grayscale": 0.0}


def _images(n=4, size=12, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_everything_off_is_the_identity_and_normalisation_round_trips():
    x = _images()
    g = torch.Generator().manual_seed(0)
    assert torch.equal(DomainBedAugment(normalized=False, **OFF)(x, g), x)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    z = (x - mean) / std
    torch.testing.assert_close(DomainBedAugment(**OFF)(z, g), z, atol=1e-6, rtol=0)


def test_flip_alone_mirrors_and_full_grayscale_equalises_channels():
    x = _images()
    g = torch.Generator().manual_seed(0)
    flipped = DomainBedAugment(normalized=False, **{**OFF, "flip": 1.0})(x, g)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-6, rtol=0)
    grey = DomainBedAugment(normalized=False, **{**OFF, "grayscale": 1.0})(x, g)
    expect = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(grey[:, c], expect)


def test_a_crop_is_a_zoom_into_the_image():
    # a horizontal ramp x = column: a crop of width fraction w spans w of the ramp's range
    ramp = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(8, 3, 64, 64).contiguous()
    out = DomainBedAugment(normalized=False, **{**OFF, "scale": (0.49, 0.49)})(
        ramp, torch.Generator().manual_seed(3))
    span = out[:, 0, 0, -1] - out[:, 0, 0, 0]
    assert torch.all(span < 0.8) and torch.all(span > 0.4)  # w = sqrt(0.49 r), r in [3/4, 4/3]
    assert torch.all(out >= 0) and torch.all(out <= 1)


def test_hue_rotation_maps_primaries_and_keeps_greys():
    red = torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
    torch.testing.assert_close(adjust_hue(red, torch.tensor([1 / 3])).flatten(),
                               torch.tensor([0.0, 1, 0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(adjust_hue(red, torch.tensor([-1 / 3])).flatten(),
                               torch.tensor([0.0, 0, 1]), atol=1e-6, rtol=0)
    x = _images()
    torch.testing.assert_close(adjust_hue(x, torch.zeros(4)), x, atol=1e-6, rtol=0)
    grey = torch.full((1, 3, 2, 2), 0.4)
    torch.testing.assert_close(adjust_hue(grey, torch.tensor([0.25])), grey)


def test_jitter_is_seeded_bounded_and_changes_images():
    x = _images(8)
    aug = DomainBedAugment(normalized=False)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.02


@pytest.mark.parametrize("bad, match", [({"scale": (0.0, 1.0)}, "scale"),
                                        ({"flip": 1.5}, "flip must be a probability"),
                                        ({"jitter": 0.7}, "jitter must be in"),
                                        ({"ratio": (2.0, 1.0)}, "ratio")])
def test_bad_settings_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        DomainBedAugment(**bad)
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        DomainBedAugment()(torch.zeros(2, 1, 4, 4), torch.Generator())


class _Stop(Callback):
    def __init__(self, at):
        super().__init__(1)
        self.at = at

    def on_step(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


def _fit(tmp, callbacks, augment):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    x, y = _images(24, 8, seed=1), torch.arange(24) % 3
    seen = []

    def spy(z, g):
        out = augment(z, g)
        seen.append(out)
        return out
    opt = build_optimizer("sam", model.parameters(), lr=0.1, rho=0.05)
    fit(model, opt, [(x, y), (x.flip(-1), y)], steps=10, batch_size=4, checkpoint_dir=tmp,
        callbacks=[*callbacks, Checkpoint(every=3)], progress=False, augment=spy)
    return model, seen


def test_fit_augments_every_training_batch_and_resumes_bit_for_bit(tmp_path):
    aug = DomainBedAugment(normalized=False)
    whole, seen = _fit(tmp_path / "a", [], aug)
    assert len(seen) == 20  # 10 steps x 2 domains
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", [_Stop(7)], aug)
    resumed, seen_b = _fit(tmp_path / "b", [], aug)  # restarts from the step-6 checkpoint
    assert len(seen_b) == 8
    for p, q in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    plain, _ = _fit(tmp_path / "c", [], DomainBedAugment(normalized=False, **OFF))
    assert not all(torch.equal(p, q) for p, q in zip(whole.parameters(), plain.parameters()))
