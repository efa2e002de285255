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


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    augment_data: bool = False,
    pixel_range: str = "[0,1]",
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from tensors already on the target device.

    Args:
        images: ``uint8`` ``(N, C, H, W)``.
        labels: ``int64`` ``(N,)``.
        batch_size: images per batch (the last one may be smaller unless ``drop_last``).
        shuffle: draw a fresh random permutation (with ``generator``) each call.
        augment_data: apply ``augment`` (4-px crop + flip) to every batch.
        pixel_range: ``"[0,1]"`` or ``"[-1,1]"``, the range of the yielded ``x``.

    Yields:
        ``x`` float32 ``(B, C, H, W)`` in ``pixel_range`` and ``y`` int64 ``(B,)``.
    """
    n = images.shape[0]
    order = torch.randperm(n, device=images.device, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            xb, yb = images[start : start + batch_size], labels[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            xb, yb = images[idx], labels[idx]
        if augment_data:
            xb = augment(xb, generator=generator)
        yield to_pixels(xb, pixel_range), yb
