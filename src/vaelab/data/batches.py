"""Batches cut and augmented on the training device, as whole-batch tensor ops.

The dataset lives on the device as ``uint8``; each step slices a random permutation
(airbench-style), so there is no per-sample Python or PIL work in the training loop.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from vaelab.data.pixels import to_pixels


def augment(x: torch.Tensor, *, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with ``pad`` pixels of zero padding and random horizontal flip.

    Args:
        x: ``(B, C, H, W)`` batch of any dtype, on any device.
        pad: padding on each side before the random ``H x W`` crop; 0 disables cropping.
        flip: flip each image left-right with probability 1/2.
        generator: a ``torch.Generator`` on ``x.device`` for reproducible draws.

    Returns:
        A new ``(B, C, H, W)`` tensor of the same dtype.
    """
    b, _, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=dev, generator=generator)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, :]  # (B, 1, W)
        # advanced indices around a slice put the indexed dims first: (B, H, W, C)
        x = xp[torch.arange(b, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(b, device=dev, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def global_batches(n: int, batch_size: int, *, order: torch.Tensor | None = None, rank: int = 0, world_size: int = 1,
                   drop_last: bool = False, device: torch.device | str = "cpu") -> Iterator[tuple[int, torch.Tensor]]:
    """Index batches for data-parallel work: yields ``(global_size, local_indices)`` per step.

    Each global batch holds ``batch_size * world_size`` consecutive entries of ``order`` (a
    permutation of ``0..n-1``, the same on every rank; ``None`` for ``0..n-1``) and is dealt out
    rank-strided: rank ``r`` gets its positions ``r, r + world_size, ...``. A final global batch with
    fewer entries than ranks is skipped, so every rank takes the same number of steps. Randomness
    drawn for a whole global batch and sliced with ``[rank::world_size]`` reaches each image the
    same way whatever the number of ranks.
    """
    step = batch_size * world_size
    stop = n - n % step if drop_last else n
    for start in range(0, stop, step):
        idx = torch.arange(start, min(start + step, n), device=device) if order is None else order[start : start + step]
        if len(idx) < world_size:
            break
        yield len(idx), idx[rank::world_size]


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    order: torch.Tensor | None = None,
    flip: bool = False,
    binarize: bool = False,
    pixel_range: str = "[0,1]",
    drop_last: bool = False,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from tensors already on the target device.

    Args:
        images: ``uint8`` ``(N, C, H, W)``.
        labels: ``int64`` ``(N,)``.
        batch_size: images per batch and process (the last one may be smaller unless ``drop_last``).
        order: a permutation of ``0..N-1`` on the images' device (e.g. ``randperm``) to visit the
            images in; ``None`` keeps their stored order.
        flip: flip each image left-right with probability 1/2 (drawn with ``generator``): the
            augmentation of generative training, where crops would teach the model padded borders.
        binarize: resample every pixel as 0/1 with probability its intensity (dynamic binarisation,
            Salakhutdinov & Murray 2008; needs ``pixel_range`` ``"[0,1]"``).
        pixel_range: ``"[0,1]"`` or ``"[-1,1]"``, the range of the yielded ``x``.
        rank, world_size: data-parallel sharding, see ``global_batches``; flips and binarisation are
            drawn for the global batch, so each image gets the same draw for any number of ranks.

    Yields:
        ``x`` float32 ``(B, C, H, W)`` in ``pixel_range`` and ``y`` int64 ``(B,)``.
    """
    shape = images.shape[1:]
    for size, idx in global_batches(images.shape[0], batch_size, order=order, rank=rank, world_size=world_size,
                                    drop_last=drop_last, device=images.device):
        xb, yb = images[idx], labels[idx]
        if flip:
            mirror = (torch.rand(size, device=images.device, generator=generator) < 0.5)[rank::world_size]
            xb = torch.where(mirror[:, None, None, None], xb.flip(3), xb)
        x = to_pixels(xb, pixel_range)
        if binarize:
            u = torch.rand((size, *shape), device=images.device, generator=generator)[rank::world_size]
            x = (u < x).float()
        yield x, yb
