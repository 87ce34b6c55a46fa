"""Multi-domain datasets for domain generalization, after DomainBed (Gulrajani & Lopez-Paz,
arXiv 2007.01434).

:class:`Domains` holds named per-domain ``(x, y)`` pairs with a shared label space. Iterating
over it yields the pairs, so a ``Domains`` is itself valid flatlab "data" (all domains pooled)
and ``[closure(d) for d in domains]`` gives one closure per domain for DGSAM/SAGM.

Builders for the synthetic DomainBed datasets, which share one construction: merge the base
dataset's splits, shuffle with a seeded permutation, and give domain ``i`` of ``E`` the examples
``i::E`` (round robin), then transform each domain:

* :func:`rotated` (RotatedMNIST): domain ``i`` rotated counter-clockwise by ``angles[i]``
  degrees (bilinear, zero fill; ``torch.nn.functional.affine_grid`` / ``grid_sample``, so no
  torchvision). Inputs ``(N, C, H, W)``, square images; labels unchanged.
* :func:`colored` (ColoredMNIST, Arjovsky et al. arXiv 1907.02893): binary label
  ``y = 1[digit < 5]`` flipped with probability ``label_noise`` (0.25), colour
  ``c = y XOR Bernoulli(e_i)`` with ``e = (0.1, 0.2, 0.9)``, image stacked into 2 channels with
  channel ``1 - c`` zeroed: inputs ``(N, 2, H, W)``, colour-label agreement ``1 - e_i`` (90%,
  80%, 10%), digit-label agreement 75%.

Per-domain 80/20 "in/out" splits: :meth:`Domains.in_out_split`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flatlab._checks import check_in_range, check_real
from flatlab.data.splits import Pair, Splits, in_out_split

__all__ = ["Domains", "colored", "merge_base", "rotate_images", "round_robin", "rotated"]


@dataclass(frozen=True, eq=False)
class Domains:
    """Named per-domain datasets with a shared label space.

    Attributes:
        names: domain names, in order (e.g. ``("0", "15", ...)`` or sorted folder names).
        data: one ``(x, y)`` pair per domain: ``x`` ``(n_i, *input_shape)`` float32, ``y``
            ``(n_i,)`` int64.
        num_classes: number of classes.
        input_shape: shape of one input.
        name: dataset name, e.g. ``"rotated_digits16"``.
    """

    names: tuple[str, ...]
    data: tuple[Pair, ...]
    num_classes: int
    input_shape: tuple[int, ...]
    name: str

    def __post_init__(self) -> None:
        if len(self.names) != len(self.data):
            raise ValueError(
                f"names and data must have the same length, got {len(self.names)} and "
                f"{len(self.data)}"
            )
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"domain names must be unique, got {self.names}")

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.data)

    def index(self, key: int | str) -> int:
        """Position of a domain given by name or index."""
        if isinstance(key, str):
            if key not in self.names:
                known = ", ".join(map(repr, self.names))
                raise KeyError(f"domain must be one of {known}, got {key!r}")
            return self.names.index(key)
        if isinstance(key, bool) or not isinstance(key, int) or not -len(self) <= key < len(self):
            raise IndexError(f"domain index must be in [0, {len(self)}), got {key!r}")
        return key % len(self)

    def __getitem__(self, key: int | str) -> Pair:
        return self.data[self.index(key)]

    def items(self) -> Iterator[tuple[str, Pair]]:
        """``(name, (x, y))`` per domain."""
        return zip(self.names, self.data)

    def sizes(self) -> dict[str, int]:
        """Number of examples per domain."""
        return {n: int(x.shape[0]) for n, (x, _) in self.items()}

    def select(self, keys: Sequence[int | str]) -> Domains:
        """The domains named (or indexed) by ``keys``, in that order."""
        idx = [self.index(k) for k in keys]
        return Domains(tuple(self.names[i] for i in idx), tuple(self.data[i] for i in idx),
                       self.num_classes, self.input_shape, self.name)

    def leave_out(self, test: int | str) -> tuple[Domains, Domains]:
        """``(training domains, test domain)`` for leave-one-domain-out."""
        t = self.index(test)
        rest = [i for i in range(len(self)) if i != t]
        return self.select(rest), self.select([t])

    def in_out_split(self, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[Domains, Domains]:
        """DomainBed's split of every domain into ``in`` (train) and ``out`` (validation) parts.

        Domain ``i`` is split with seed ``seed * 1000 + i``, so domains get different
        permutations and the split of one domain does not depend on the others.
        """
        ins, outs = zip(*(in_out_split(p, holdout_fraction=holdout_fraction, seed=seed * 1000 + i)
                          for i, p in enumerate(self.data)))
        return (Domains(self.names, tuple(ins), self.num_classes, self.input_shape, self.name),
                Domains(self.names, tuple(outs), self.num_classes, self.input_shape, self.name))

    def to(self, device: str | torch.device) -> Domains:
        """The same domains with every tensor on ``device``."""
        data = tuple((x.to(device), y.to(device)) for x, y in self.data)
        return Domains(self.names, data, self.num_classes, self.input_shape, self.name)

    def pooled(self) -> Pair:
        """All domains concatenated into one ``(x, y)`` pair."""
        xs, ys = zip(*self.data)
        return torch.cat(xs), torch.cat(ys)


def merge_base(base: Splits | Pair) -> Pair:
    """``base`` as one pair: a :class:`Splits` has train, val and test concatenated (DomainBed
    merges MNIST's train and test sets before dividing it into domains)."""
    if isinstance(base, Splits):
        parts = (base.train, base.val, base.test)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if isinstance(base, (tuple, list)) and len(base) == 2 and all(
            isinstance(t, torch.Tensor) for t in base):
        if base[0].shape[0] != base[1].shape[0]:
            raise ValueError(f"base inputs and labels must have the same length, got "
                             f"{base[0].shape[0]} and {base[1].shape[0]}")
        return base[0], base[1]
    raise TypeError(f"base must be a Splits or an (x, y) tensor pair, got {type(base).__name__}")


def round_robin(data: Pair, n_domains: int, seed: int) -> list[Pair]:
    """Shuffle ``data`` with a seeded permutation and deal it into ``n_domains`` parts ``i::E``."""
    x, y = data
    if x.shape[0] < n_domains:
        raise ValueError(f"base must have at least {n_domains} examples (one per domain), "
                         f"got {x.shape[0]}")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(int(seed)))
    return [(x[perm[i::n_domains]], y[perm[i::n_domains]]) for i in range(n_domains)]


def _as_images(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    if x.dim() != 4:
        raise ValueError(f"base inputs must be images (N, C, H, W) or (N, H, W), got shape "
                         f"{tuple(x.shape)}")
    return x.float()


def rotate_images(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate square images ``(N, C, H, W)`` counter-clockwise by ``angle`` degrees.

    Output pixel ``p`` (normalised coordinates, y pointing down) samples the input at
    ``R p`` with ``R = [[cos a, -sin a], [sin a, cos a]]``: bilinear, zero outside. 90 degrees
    equals ``torch.rot90(x, 1, dims=(-2, -1))``.
    """
    x = _as_images(x)
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"images must be square to rotate, got {tuple(x.shape[-2:])}")
    a = math.radians(check_real("angle", angle))
    if a == 0.0:
        return x.clone()
    c, s = math.cos(a), math.sin(a)
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotated(
    base: Splits | Pair,
    angles: Sequence[float] = (0, 15, 30, 45, 60, 75),
    seed: int = 0,
    name: str | None = None,
) -> Domains:
    """RotatedMNIST's construction on any image dataset: one domain per angle (degrees).

    Example:
        >>> from flatlab.data import digits
        >>> d = rotated(digits(size=16), angles=(0, 45))
        >>> d.names, d.input_shape
        (('0', '45'), (1, 16, 16))
    """
    x, y = merge_base(base)
    x = _as_images(x)
    if len(angles) == 0:
        raise ValueError("angles must be non-empty, got ()")
    names = tuple(f"{a:g}" for a in angles)
    parts = round_robin((x, y), len(angles), seed)
    data = tuple((rotate_images(px, a).contiguous(), py) for (px, py), a in zip(parts, angles))
    num_classes = base.num_classes if isinstance(base, Splits) else int(y.max()) + 1
    base_name = base.name if isinstance(base, Splits) else "images"
    return Domains(names, data, int(num_classes), tuple(x.shape[1:]),
                   name or f"rotated_{base_name}")


def _agreement_name(e: float) -> str:
    agree = round(100 * (1 - e))
    return f"+{agree}%" if agree >= 50 else f"-{100 - agree}%"


def colored(
    base: Splits | Pair,
    flip_probs: Sequence[float] = (0.1, 0.2, 0.9),
    label_noise: float = 0.25,
    seed: int = 0,
    name: str | None = None,
) -> Domains:
    """ColoredMNIST's construction on any grayscale digit dataset (2 classes, 2 channels).

    Domain ``i``: ``y = 1[digit < 5] XOR Bernoulli(label_noise)``,
    ``colour = y XOR Bernoulli(flip_probs[i])``, ``x = [img * (colour == 0), img * (colour == 1)]``.
    Domain names follow DomainBed: ``"+90%"``, ``"+80%"``, ``"-90%"`` (colour-label agreement,
    with a minus for anti-correlation).
    """
    x, digit = merge_base(base)
    x = _as_images(x)
    if x.shape[1] != 1:
        raise ValueError(f"base images must have 1 channel (grayscale), got {x.shape[1]}")
    if len(flip_probs) == 0:
        raise ValueError("flip_probs must be non-empty, got ()")
    for i, e in enumerate(flip_probs):
        check_in_range(f"flip_probs[{i}]", e, 0.0, 1.0, closed="[]")
    p = check_in_range("label_noise", label_noise, 0.0, 1.0, closed="[]")
    names = tuple(_agreement_name(e) for e in flip_probs)
    if len(set(names)) != len(names):
        names = tuple(f"{n}#{i}" for i, n in enumerate(names))
    g = torch.Generator().manual_seed(int(seed) + 1)
    data = []
    for (img, dig), e in zip(round_robin((x, digit), len(flip_probs), seed), flip_probs):
        n = img.shape[0]
        y = (dig < 5).long() ^ (torch.rand(n, generator=g) < p).long()  # (n,)
        colour = y ^ (torch.rand(n, generator=g) < e).long()  # (n,)
        two = img.repeat(1, 2, 1, 1)  # (n, 2, H, W)
        keep = F.one_hot(colour, 2).to(two.dtype)[:, :, None, None]  # (n, 2, 1, 1)
        data.append(((two * keep).contiguous(), y))
    base_name = base.name if isinstance(base, Splits) else "images"
    return Domains(names, tuple(data), 2, (2, *x.shape[2:]), name or f"colored_{base_name}")
