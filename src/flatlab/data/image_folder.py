"""DomainBed's image-folder datasets on disk: ``root/<dataset>/<domain>/<class>/<image>``.

Domains are the *sorted* subfolder names of ``root/<dataset>`` (DomainBed's environment
order), classes the sorted union of class-folder names over all domains (so every domain
shares one label index). Images (``.jpg .jpeg .png .bmp .gif .tif .tiff .webp``, any case;
hidden files skipped) are decoded with Pillow, converted to RGB, resized to ``size x size``
(bilinear), scaled to [0, 1] and, if ``normalize``, standardised with the ImageNet channel
statistics ``mean = (0.485, 0.456, 0.406)``, ``std = (0.229, 0.224, 0.225)`` as DomainBed does.
Inputs are float32 ``(n, 3, size, size)``, labels int64 ``(n,)``.

Known datasets and their DomainBed folder names: PACS -> ``PACS``, VLCS -> ``VLCS``,
OfficeHome -> ``office_home``, TerraIncognita -> ``terra_incognita``, DomainNet ->
``domain_net``. Everything is held in memory: about ``12 * size**2`` bytes per image (49 kB at
the default 64), so PACS (9,991 images) needs ~0.5 GB; use ``max_per_class`` for a subset.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flatlab._checks import check_positive_int
from flatlab.data.domains import Domains

__all__ = ["DOMAINBED_FOLDERS", "IMAGE_EXTENSIONS", "image_folder", "load_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DOMAINBED_FOLDERS = {
    "pacs": "PACS", "vlcs": "VLCS", "office_home": "office_home",
    "terra_incognita": "terra_incognita", "domain_net": "domain_net",
    "officehome": "office_home", "terraincognita": "terra_incognita", "domainnet": "domain_net",
}
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def load_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """One image as float32 ``(3, size, size)`` in [0, 1] (Pillow decode, RGB, bilinear resize)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)  # (size, size, 3)
    except OSError as err:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"image must be decodable by Pillow, got {path}: {err}") from err
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def image_folder(
    root: str | os.PathLike,
    dataset: str | None = None,
    size: int = 64,
    normalize: bool = True,
    domains: list[str] | None = None,
    max_per_class: int | None = None,
) -> Domains:
    """Read ``root/<dataset>/<domain>/<class>/<image>`` into :class:`Domains`.

    Args:
        root: data root (``dataset`` is a subfolder of it), or the dataset folder itself if
            ``dataset`` is None.
        dataset: folder name, e.g. ``"PACS"`` or ``"office_home"``; DomainBed's dataset names
            (``"OfficeHome"``, ``"TerraIncognita"``, ``"DomainNet"``, any case) find their
            folders too.
        size: images are resized to ``size x size``.
        normalize: standardise with ImageNet channel statistics.
        domains: read only these domains (names of subfolders); default all, sorted.
        max_per_class: keep at most this many images per class and domain (the first ones in
            sorted file order).

    Raises:
        FileNotFoundError: naming the missing dataset or domain folder.
        ValueError: if a domain holds no image, the dataset no domain, or an image file cannot
            be decoded (the message names the file).
    """
    check_positive_int("size", size)
    if max_per_class is not None:
        check_positive_int("max_per_class", max_per_class)
    folder = Path(root).expanduser()
    if dataset is not None:
        alias = DOMAINBED_FOLDERS.get(dataset.lower())
        named = folder / dataset
        folder = folder / alias if not named.is_dir() and alias is not None else named
    if not folder.is_dir():
        raise FileNotFoundError(f"image-folder dataset directory not found: {folder}")
    domain_dirs = _subdirs(folder)
    if domains is not None:
        missing = [d for d in domains if not (folder / d).is_dir()]
        if missing:
            raise FileNotFoundError(f"domain directory not found: {folder / missing[0]}")
        domain_dirs = [folder / d for d in domains]
    if not domain_dirs:
        raise ValueError(f"{folder} must contain one folder per domain, got none")
    classes = sorted({c.name for d in domain_dirs for c in _subdirs(d)})
    label = {c: i for i, c in enumerate(classes)}
    data = []
    for d in domain_dirs:
        xs, ys = [], []
        for c in _subdirs(d):
            files = _images(c)[:max_per_class]
            xs += [load_image(f, size) for f in files]
            ys += [label[c.name]] * len(files)
        if not xs:
            raise ValueError(f"domain {d} must contain images in class folders, got none")
        x = torch.stack(xs)  # (n, 3, size, size)
        if normalize:
            x = (x - _MEAN) / _STD
        data.append((x, torch.tensor(ys, dtype=torch.int64)))
    return Domains(tuple(d.name for d in domain_dirs), tuple(data), len(classes),
                   (3, size, size), dataset or folder.name)
