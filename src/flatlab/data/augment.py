"""DomainBed's training-image augmentation as batched tensor operations (no torchvision).

DomainBed (Gulrajani & Lopez-Paz, arXiv 2007.01434, ``datasets.py``) augments the images of
the *training* environments with torchvision's ``RandomResizedCrop(224, scale=(0.7, 1.0))``,
``RandomHorizontalFlip()``, ``ColorJitter(0.3, 0.3, 0.3, 0.3)``, ``RandomGrayscale()``
(p = 0.1) and ImageNet normalisation; evaluation images are only resized. Here every
operation acts on a whole minibatch ``(B, 3, H, W)`` already on its device, with every random
draw taken from an explicit CPU ``torch.Generator`` (in :func:`flatlab.train.fit`, the
data-order generator, so a resumed run augments bit for bit as the uninterrupted one):

* **crop + flip**: per image an area fraction ``s ~ U(scale)`` and aspect ratio
  ``r ~ logU(ratio)`` give a ``sqrt(s r) W x sqrt(s / r) H`` window (clipped to the image) at
  a uniform position, mirrored with probability ``flip``, resampled bilinearly to ``H x W``
  by one ``affine_grid`` / ``grid_sample`` (torchvision instead crops the full-size image
  before resizing; here the already-resized image is cropped);
* **colour jitter**: brightness ``x b``, contrast ``m + c (x - m)`` (``m`` the image's mean
  grey level), saturation ``g + s (x - g)`` (``g`` its grey image) with ``b, c, s ~
  U(1 - j, 1 + j)``, and a hue rotation by ``h ~ U(-j, j)`` turns in HSV space, each
  clamped to [0, 1], in an order drawn per batch (torchvision draws it per image);
* **grayscale** with probability ``grayscale``: ``0.299 R + 0.587 G + 0.114 B`` in all
  three channels.

Images stored normalised (``(x - mean) / std``, :func:`flatlab.data.image_folder`) are
un-normalised first and normalised again after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DomainBedAugment", "adjust_hue"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GREY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)  # (B, 1, H, W)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images ``x`` ``(B, 3, H, W)`` in [0, 1] by ``shift`` ``(B,)`` turns.

    RGB -> HSV, ``h <- (h + shift) mod 1``, HSV -> RGB through
    ``f(n) = v - v s clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``, n = 5, 3, 1.
    """
    maxc, _ = x.max(dim=1)  # (B, H, W)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(dim=1)
    h = torch.where(maxc == r, ((g - b) / safe) % 6,
                    torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    h = (h + shift.to(x.dtype).view(-1, 1, 1)) % 1.0
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6 * h) % 6
        out.append(maxc - maxc * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, dim=1)


@dataclass(frozen=True)
class DomainBedAugment:
    """``augment(x, generator)``: DomainBed's training augmentation of a minibatch.

    Args:
        normalized: the images are stored ImageNet-normalised (undo, augment, redo).
        scale: range of the crop's area fraction (DomainBed: 0.7 to 1).
        ratio: range of the crop's aspect ratio, sampled log-uniformly.
        flip: probability of a horizontal mirror.
        jitter: strength of brightness, contrast, saturation (factor ``U(1 - j, 1 + j)``) and
            hue (``U(-j, j)`` turns; at most 0.5).
        grayscale: probability of turning an image grey.

    Example:
        >>> aug = DomainBedAugment()
        >>> aug(torch.zeros(2, 3, 16, 16), torch.Generator().manual_seed(0)).shape
        torch.Size([2, 3, 16, 16])
    """

    normalized: bool = True
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: float = 0.3
    grayscale: float = 0.1

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        for name in ("flip", "grayscale"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], "
                                 f"got {getattr(self, name)}")
        if not 0 <= self.jitter <= 0.5:
            raise ValueError(f"jitter must be in [0, 0.5], got {self.jitter}")

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
        dev, dt = x.device, x.dtype
        mean = torch.tensor(IMAGENET_MEAN, dtype=dt, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=dt, device=dev).view(1, 3, 1, 1)
        if self.normalized:
            x = x * std + mean
        x = self._crop_flip(x, generator)
        x = self._jitter(x, generator)
        if self.grayscale > 0:
            grey = torch.rand(x.shape[0], generator=generator) < self.grayscale
            x = torch.where(grey.to(dev).view(-1, 1, 1, 1), _grey(x).expand_as(x), x)
        return (x - mean) / std if self.normalized else x

    def _crop_flip(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One affine resampling per image: the crop window's size, centre and mirror."""
        n = x.shape[0]
        area = _uniform(n, *self.scale, g)
        ratio = torch.exp(_uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), g))
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the width / height
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (1 - w) * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
        cy = (1 - h) * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
        mirror = torch.where(torch.rand(n, generator=g) < self.flip, -1.0, 1.0).double()
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0], theta[:, 0, 2] = w * mirror, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        if torch.equal(theta, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(n, 2, 3)):
            return x  # no crop, no mirror: skip the resampling
        grid = F.affine_grid(theta.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def _jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        j = self.jitter
        if j == 0:
            return x
        n, dev = x.shape[0], x.device
        factors = [_uniform(n, 1 - j, 1 + j, g).to(x.dtype).to(dev).view(-1, 1, 1, 1)
                   for _ in range(3)]
        hue = _uniform(n, -j, j, g).to(dev)
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0:
                x = (x * factors[0]).clamp(0, 1)
            elif op == 1:
                m = _grey(x).mean(dim=(2, 3), keepdim=True)
                x = (m + factors[1] * (x - m)).clamp(0, 1)
            elif op == 2:
                grey = _grey(x)
                x = (grey + factors[2] * (x - grey)).clamp(0, 1)
            else:
                x = adjust_hue(x, hue).clamp(0, 1)
        return x
