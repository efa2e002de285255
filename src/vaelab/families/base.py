"""What the family modules share: the ``Sampler`` record and label helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vaelab.errors import ConfigError


@dataclass
class Sampler:
    """A validated way to draw images from a trained model.

    Attributes:
        name: the sampler's name, e.g. ``"prior"``, ``"ddpm"``, ``"ddim"``.
        options: JSON-able settings, as given to ``--sampler``/``--steps`` (written with results).
        label: a short description for tables, e.g. ``"DDIM, 50 steps"``.
        network_evaluations: network passes per image (1 for a VAE decoder, ``steps`` for diffusion).
        latent_space: what is sampled to make an image, in words.
        draw: ``draw(n, generator, y)`` -> ``(n, C, H, W)`` float images in the model's pixel range;
            ``y`` int64 ``(n,)`` labels for a conditional model (``None`` otherwise). One call is one batch.
    """

    name: str
    options: dict
    label: str
    network_evaluations: int
    latent_space: str
    draw: Callable[[int, torch.Generator | None, torch.Tensor | None], torch.Tensor] = field(repr=False)


def cycle_labels(model, n: int) -> torch.Tensor | None:
    """``arange(n) % num_classes`` (int64, CPU) for a conditional model: a class-balanced draw; else ``None``."""
    if not model.conditional:
        return None
    return torch.arange(n) % model.config.num_classes


def constant_labels(model, index: int, n: int) -> torch.Tensor:
    """``n`` copies of class ``index`` (int64, CPU) for a conditional model.

    Raises:
        ConfigError: the model is unconditional, or ``index`` is outside ``0..num_classes-1``.
    """
    if not model.conditional:
        raise ConfigError("--class needs a conditional model (e.g. --model cvae-mnist, or a DDPM with "
                          "class_conditional: true); this run holds an unconditional one")
    k = model.config.num_classes
    if not 0 <= index < k:
        raise ConfigError(f"--class {index} is out of range; the model has classes 0..{k - 1}")
    return torch.full((n,), index, dtype=torch.int64)
