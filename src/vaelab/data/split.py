"""``ImageSplit``: one split of an image dataset as tensors, and the ways vaelab cuts splits."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vaelab.errors import DataError


@dataclass
class ImageSplit:
    """One split of an image dataset, fully decoded.

    Attributes:
        images: ``uint8`` tensor ``(N, C, H, W)``, pixel values 0..255.
        labels: ``int64`` tensor ``(N,)`` of class indices into ``classes``.
        classes: class names, index ``i`` names label ``i``.
        source: a human-readable description of where the pixels came from, used to label
            every number measured on them (e.g. ``"CIFAR-10 (JPEG q75 copy)"``).
        name: the dataset name it was loaded as (``"mnist"``, ``"tensors"``, ...).
        factors: ``int64`` ``(N, K)`` ground-truth generative factors of each image, as indices
            into each factor's values (a generated dataset such as ``vaelab.data.shapes``), or
            ``None`` when the images have no known factors (every real dataset).
        factor_names: the ``K`` factor names (column ``k`` of ``factors``); empty without factors.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    source: str
    name: str = ""
    factors: torch.Tensor | None = None
    factor_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> "ImageSplit":
        return dataclasses.replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def subset(self, index: torch.Tensor | slice) -> "ImageSplit":
        factors = None if self.factors is None else self.factors[index]
        return dataclasses.replace(self, images=self.images[index], labels=self.labels[index], factors=factors)

    def sample(self, n: int, seed: int = 0) -> "ImageSplit":
        """``n`` images drawn at random without replacement (seeded), kept in the split's order; the
        whole split when ``n >= len(self)``. A random draw, not the first ``n``: image folders (e.g.
        the CIFAR-10 JPEG copy) are stored class by class, so their first images are one or two classes."""
        if n >= len(self):
            return self
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return self.subset(index)


@dataclass
class RunData:
    """The three splits of a run, as it was trained (subsets, validation hold-out, binarisation)."""

    train: ImageSplit
    val: ImageSplit
    test: ImageSplit

    def to(self, device: torch.device | str) -> "RunData":
        return RunData(self.train.to(device), self.val.to(device), self.test.to(device))


def split_validation(train: ImageSplit, fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """Hold out a seeded random ``fraction`` of ``train`` as a validation split.

    Returns:
        ``(train_rest, val)``; ``val`` has ``max(1, round(fraction * N))`` images.

    Raises:
        DataError: ``fraction`` outside ``(0, 1)`` or a split too small to divide.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {fraction}")
    n = len(train)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise DataError(f"cannot hold out {n_val} of {n} training images for validation")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[n_val:]), train.subset(perm[:n_val])


def binarize_split(split: ImageSplit, seed: int) -> ImageSplit:
    """A copy of ``split`` with every pixel resampled once as 0 or 255 with probability ``v / 255``
    (stochastic binarisation, seeded; the fixed evaluation set of a dynamically binarised run)."""
    gen = torch.Generator(device=split.images.device).manual_seed(seed)
    p = split.images.float().div(255.0)
    images = (torch.bernoulli(p, generator=gen) * 255).to(torch.uint8)
    return dataclasses.replace(split, images=images, source=f"{split.source}, binarised (seed {seed})")
