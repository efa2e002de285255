"""What the family modules share: the ``Sampler`` record and label helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from vaelab.data import to_pixels
from vaelab.errors import ConfigError
from vaelab.runtime import Distributed, derive_seed


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
        steps: the length of its chain of denoising steps where the family takes ``steps`` (diffusion),
            ``None`` where it takes none (a VAE's samplers, also the PixelCNN prior's cell-by-cell pass).
    """

    name: str
    options: dict
    label: str
    network_evaluations: int
    latent_space: str
    draw: Callable[[int, torch.Generator | None, torch.Tensor | None], torch.Tensor] = field(repr=False)
    steps: int | None = None


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


EVAL_BLOCK = 500  # images per noise block in evaluation: the draws do not depend on batch size or ranks


def eval_blocks(model, split, *, seed: int, dist: Distributed | None = None, block: int = EVAL_BLOCK):
    """Iterate over ``split`` for evaluation: yields ``(x, y, noise, idx)`` for this rank's share.

    The split is cut into blocks of ``block`` images; the model's noise for a block (``model.draw_noise``)
    comes from a generator seeded from ``(seed, block index)`` and each rank takes the rows
    ``rank::world_size`` of the block. Every image thus gets the same noise with any number of ranks,
    so reduced sums equal the single-process numbers (up to float summation order).
    """
    dist = dist or Distributed()
    device = split.images.device
    pixel_range = model.config.pixel_range
    for b, start in enumerate(range(0, len(split), block)):
        idx = torch.arange(start, min(start + block, len(split)), device=device)
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "eval", b))
        noise = model.draw_noise(len(idx), gen, device)
        local = idx[dist.rank :: dist.world_size]
        if len(local):
            yield (to_pixels(split.images[local], pixel_range), split.labels[local],
                   {k: v[dist.rank :: dist.world_size] for k, v in noise.items()}, local)


def gather_rows(dist: Distributed, idx: torch.Tensor, *rows: torch.Tensor) -> list[torch.Tensor]:
    """Reassemble per-rank rows (``rows[k][j]`` belongs to image ``idx[j]``) into full CPU tensors in image order."""
    if not dist.active:
        return [r.cpu() for r in rows]
    parts = dist.gather((idx.cpu(), [r.cpu() for r in rows]))
    order = torch.cat([p[0] for p in parts]).argsort()
    return [torch.cat([p[1][k] for p in parts])[order] for k in range(len(rows))]
