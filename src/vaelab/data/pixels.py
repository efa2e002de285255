"""Pixel-range conversions, in one place.

Datasets are stored as ``uint8`` 0..255. Models see float pixels in ``[0, 1]`` or ``[-1, 1]``
(``pixel_range``); diffusion models work on ``[-1, 1]`` internally; pictures and metrics want
``[0, 1]`` or ``uint8``. Every conversion between these goes through the functions below.
"""

from __future__ import annotations

import torch

PIXEL_RANGES = ("[0,1]", "[-1,1]")


def to_pixels(x_u8: torch.Tensor, pixel_range: str = "[0,1]") -> torch.Tensor:
    """``uint8`` 0..255 ``(B, C, H, W)`` -> ``float32`` in ``[0, 1]`` or ``[-1, 1]``."""
    x = x_u8.float().div_(255.0)
    return x.mul_(2.0).sub_(1.0) if pixel_range == "[-1,1]" else x


def to_uint8(x: torch.Tensor, pixel_range: str = "[0,1]") -> torch.Tensor:
    """Inverse of ``to_pixels``: float pixels in ``pixel_range`` -> ``uint8`` (rounded, clamped)."""
    return (to_unit_interval(x, pixel_range) * 255.0).round().to(torch.uint8)


def to_unit_interval(x: torch.Tensor, pixel_range: str = "[0,1]") -> torch.Tensor:
    """Float pixels in ``pixel_range`` -> float pixels in ``[0, 1]`` (clamped): what image writers want."""
    if pixel_range == "[-1,1]":
        x = (x + 1.0) / 2.0
    return x.clamp(0.0, 1.0)


def from_unit_interval(x: torch.Tensor, pixel_range: str = "[0,1]") -> torch.Tensor:
    """Values in ``[0, 1]`` (e.g. a sigmoid) -> float pixels in ``pixel_range``; inverse of ``to_unit_interval``."""
    return x * 2.0 - 1.0 if pixel_range == "[-1,1]" else x


def to_symmetric(x: torch.Tensor, pixel_range: str = "[0,1]") -> torch.Tensor:
    """Float pixels in ``pixel_range`` -> ``[-1, 1]`` (the scale of diffusion models and logistic likelihoods)."""
    return x * 2.0 - 1.0 if pixel_range == "[0,1]" else x


def from_symmetric(x: torch.Tensor, pixel_range: str = "[0,1]") -> torch.Tensor:
    """``[-1, 1]`` values (clamped) -> float pixels in ``pixel_range``; inverse of ``to_symmetric``."""
    x = x.clamp(-1.0, 1.0)
    return (x + 1.0) / 2.0 if pixel_range == "[0,1]" else x
