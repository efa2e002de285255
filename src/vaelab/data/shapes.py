"""``shapes``: a procedural dSprites-like dataset with known generative factors, rendered on the machine.

Every image is one white shape on black, and every combination of the five factors appears exactly
once (as in dSprites, Matthey et al. 2017, which has 3 x 6 x 40 x 32 x 32 images at 64 x 64):

| factor | values |
|---|---|
| ``shape`` | square, ellipse, heart (also the class label) |
| ``scale`` | ``scales`` values, linearly 0.5 .. 1.0 |
| ``orientation`` | ``orientations`` angles, ``2 pi k / orientations`` radians (as in dSprites, the square's 90 degree and the ellipse's 180 degree symmetries make some angles look alike) |
| ``pos_x``, ``pos_y`` | ``positions`` centres each, evenly over the frame in whole-pixel steps, so that every shape stays inside it (in ``[-1, 1]`` frame units in the manifest) |

Pixels are the share of 3 x 3 sub-pixel samples inside the shape (anti-aliased edges), ``uint8`` 0..255.
``write_shapes(OUT)`` writes ``OUT/train.safetensors`` and ``OUT/test.safetensors`` (the ``tensors``
dataset type, with the factors as an extra tensor, see ``vaelab.data.tensors``) and ``OUT/manifest.json``,
so ``vaelab train --dataset tensors --data-root OUT`` trains on it and ``vaelab evaluate --metrics
disentanglement`` scores the codes against the factors.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vaelab.data.split import ImageSplit
from vaelab.data.tensors import write_tensor_file
from vaelab.errors import ConfigError
from vaelab.io import write_json

SHAPES = ("square", "ellipse", "heart")
FACTOR_NAMES = ("shape", "scale", "orientation", "pos_x", "pos_y")
SUBSAMPLES = 3  # sub-pixel samples per axis
RADIUS = 0.3  # a shape's half-size at scale 1, in units of the half-frame
REACH = 1.45  # the farthest point of any shape from its centre, in units of RADIUS * scale (the square's corner: sqrt 2)


@dataclass(frozen=True)
class ShapesSpec:
    """The grid of factor values; ``count`` images in all (3 shapes x scales x orientations x positions^2)."""

    image_size: int = 64
    scales: int = 5
    orientations: int = 8
    positions: int = 10
    test_fraction: float = 0.1
    seed: int = 0

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of values of each factor, in ``FACTOR_NAMES`` order."""
        return (len(SHAPES), self.scales, self.orientations, self.positions, self.positions)

    @property
    def count(self) -> int:
        return math.prod(self.sizes)

    def check(self) -> None:
        """Raises ``ConfigError`` naming the first field out of range."""
        for name, low in (("image_size", 8), ("scales", 1), ("orientations", 1), ("positions", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"shapes: {name} must be an integer >= {low}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"shapes: seed must be an integer, got {self.seed!r}")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) \
                or not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"shapes: test_fraction must be in (0, 1), got {self.test_fraction!r}")
        offsets = _offsets(self)
        if len(set(offsets)) < len(offsets):
            raise ConfigError(f"shapes: {self.positions} positions do not fit as whole-pixel steps in a "
                              f"{self.image_size}-pixel frame; at most {2 * max(offsets) + 1}")

    def values(self) -> dict[str, list]:
        """What each factor index stands for: shape names, scales, angles (radians), centres in [-1, 1]."""
        return {
            "shape": list(SHAPES),
            "scale": torch.linspace(0.5, 1.0, self.scales).tolist() if self.scales > 1 else [1.0],
            "orientation": [2 * math.pi * k / self.orientations for k in range(self.orientations)],
            "pos_x": [2 * o / self.image_size for o in _offsets(self)],
            "pos_y": [2 * o / self.image_size for o in _offsets(self)],
        }


def factor_grid(spec: ShapesSpec) -> torch.Tensor:
    """Every combination of factor indices once, in row-major order: ``int64`` ``(spec.count, 5)``."""
    axes = [torch.arange(n) for n in spec.sizes]
    return torch.cartesian_prod(*axes).reshape(-1, len(axes)).long()


def _inside(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whether the points ``(u, v)`` (shape-local units, ``(B, P)``) lie inside each image's shape ``(B, 1)``."""
    square = torch.maximum(u.abs(), v.abs()) <= 1.0
    ellipse = u.square() + (v / 0.6).square() <= 1.0
    hu, hv = u / 0.85, 0.125 - v / 0.85  # the curve (x² + y² − 1)³ = x² y³: lobes up, point down, centred
    heart = (hu.square() + hv.square() - 1).pow(3) - hu.square() * hv.pow(3) <= 0
    return torch.where(shape == 0, square, torch.where(shape == 1, ellipse, heart))


def _offsets(spec: ShapesSpec) -> list[int]:
    """Centre offsets from the middle of the frame, in whole pixels (so a position is an exact shift)."""
    reach = math.floor(spec.image_size / 2 * (1.0 - RADIUS * REACH)) - 1  # the largest shape keeps a black border
    if spec.positions == 1:
        return [0]
    return [round(-reach + 2 * reach * i / (spec.positions - 1)) for i in range(spec.positions)]


def render(spec: ShapesSpec, factors: torch.Tensor) -> torch.Tensor:
    """Images of the given factor indices: ``(N, 5)`` int64 -> ``uint8`` ``(N, 1, S, S)``, 0..255.

    Each (shape, scale, orientation) sprite is rendered once in the middle of the frame and shifted by
    whole pixels to its position. Deterministic (no randomness): the same indices give the same pixels.
    """
    values = spec.values()
    s, k = spec.image_size, SUBSAMPLES
    # sub-pixel sample points in [-1, 1] (y downwards, as images are stored)
    t = (torch.arange(s * k, dtype=torch.float32) + 0.5) / (s * k) * 2 - 1
    gy, gx = torch.meshgrid(t, t, indexing="ij")
    gx, gy = gx.reshape(1, -1), gy.reshape(1, -1)
    sprites = factor_grid(replace(spec, positions=1))[:, :3]  # every (shape, scale, orientation) once
    scale = torch.tensor(values["scale"])[sprites[:, 1]].unsqueeze(1)
    angle = torch.tensor(values["orientation"])[sprites[:, 2]].unsqueeze(1)
    cos, sin, size = torch.cos(angle), torch.sin(angle), RADIUS * scale
    u, v = (cos * gx + sin * gy) / size, (-sin * gx + cos * gy) / size  # the frame rotated by -angle
    inside = _inside(sprites[:, :1], u, v).to(torch.float32).reshape(-1, 1, s * k, s * k)
    sprite_pixels = (torch.nn.functional.avg_pool2d(inside, k) * 255).round().to(torch.uint8)
    sprite_index = (factors[:, 0] * spec.scales + factors[:, 1]) * spec.orientations + factors[:, 2]
    offsets = _offsets(spec)
    images = torch.empty(len(factors), 1, s, s, dtype=torch.uint8)
    for n, (i, fx, fy) in enumerate(zip(sprite_index.tolist(), factors[:, 3].tolist(), factors[:, 4].tolist())):
        images[n] = torch.roll(sprite_pixels[i], (offsets[fy], offsets[fx]), dims=(1, 2))
    return images


def make_shapes(spec: ShapesSpec = ShapesSpec()) -> ImageSplit:
    """All ``spec.count`` images with their factors (``factor_grid`` order); labels are the shape index."""
    spec.check()
    factors = factor_grid(spec)
    source = (f"shapes (procedural dSprites-like, {spec.image_size}x{spec.image_size}, "
              f"{' x '.join(map(str, spec.sizes))} factor values)")
    return ImageSplit(render(spec, factors), factors[:, 0].clone(), list(SHAPES), source, "tensors",
                      factors=factors, factor_names=FACTOR_NAMES)


def write_shapes(out: str | os.PathLike, spec: ShapesSpec = ShapesSpec()) -> Path:
    """Render every combination and write ``OUT/{train,test}.safetensors`` and ``OUT/manifest.json``.

    The test split is a seeded random ``test_fraction`` of the combinations, the train split the rest.

    Raises:
        ConfigError: a spec field out of range, or ``out`` exists and is not an empty folder (checked
            before rendering).
    """
    spec.check()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; choose a new folder")
    data = make_shapes(spec)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(spec.seed))
    n_test = min(len(data) - 1, max(1, round(spec.test_fraction * len(data))))  # neither split empty
    test, train = data.subset(perm[:n_test].sort().values), data.subset(perm[n_test:].sort().values)
    values = spec.values()
    tmp = out.parent / f".{out.name}.tmp"  # written whole, then renamed: the folder is complete or absent
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_tensor_file(train, tmp / "train.safetensors", factor_values=values)
    write_tensor_file(test, tmp / "test.safetensors", factor_values=values)
    write_json(tmp / "manifest.json", {
        "dataset": "shapes", "source": data.source, "spec": asdict(spec), "factor_names": list(FACTOR_NAMES),
        "factor_values": values, "images": {"train": len(train), "test": len(test)},
    })
    if out.exists():
        out.rmdir()  # empty, checked above
    tmp.rename(out)
    return out
